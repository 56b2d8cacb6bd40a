"""Celery entry points: ids in, the engine does the work."""

from celery import shared_task

from . import engine


@shared_task(acks_late=True)
def advance_release(release_id: int) -> None:
    engine.advance(release_id)


@shared_task(acks_late=True)
def rollback_release(release_id: int) -> None:
    engine.rollback(release_id)


@shared_task
def sweep() -> dict:
    return engine.sweep()
