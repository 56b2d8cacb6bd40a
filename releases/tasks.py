"""Celery entry points: ids in, the engine does the work, and a release that
waits on AWS is queued again with a countdown rather than held by a worker."""

from celery import shared_task

from . import engine


@shared_task(acks_late=True)
def advance_release(release_id: int) -> None:
    delay = engine.advance(release_id)
    if delay is not None:
        advance_release.apply_async((release_id,), countdown=delay)


@shared_task(acks_late=True)
def rollback_release(release_id: int) -> None:
    """A rollback is steps of the release like any other; this name stays for messages queued before."""
    advance_release(release_id)


@shared_task
def sweep() -> dict:
    result = engine.sweep()
    for release_id in result["nudge"]:
        advance_release.delay(release_id)
    return {**result, "nudge": len(result["nudge"])}
