"""Celery entry points: ids in, the engine does the work, and a release that
waits on AWS is queued again with a countdown rather than held by a worker."""

import logging

from celery import shared_task
from kombu.exceptions import OperationalError

from . import cleanup, engine

log = logging.getLogger(__name__)


def nudge(release_id: int, *, countdown: float | None = None) -> bool:
    """Queue `advance_release`; False when the broker cannot take it now.

    A message is a nudge, not the work: the release is in the database, and
    the sweep nudges every release that is due (a wait whose time has come, a
    queued release, a step whose worker died) once Redis answers again. So a
    broker that is down costs a delay, never a crashed task or a failed request.
    """
    try:
        if countdown is None:
            advance_release.delay(release_id)
        else:
            advance_release.apply_async((release_id,), countdown=countdown)
    except OperationalError as exc:
        log.warning("could not queue release %s (the sweep will nudge it when the broker is back): %s",
                    release_id, type(exc).__name__)
        return False
    return True


@shared_task(acks_late=True)
def advance_release(release_id: int) -> None:
    delay = engine.advance(release_id)
    if delay is not None:
        nudge(release_id, countdown=delay)


@shared_task(acks_late=True)
def rollback_release(release_id: int) -> None:
    """Kept only for messages that an older Greenlight queued under this name.

    A rollback used to be a task of its own; it is now the release's undo
    steps, run by `advance_release` like any other. A message still waiting
    in Redis (a countdown, or a queue not yet drained when the workers were
    upgraded) names this task: without it a worker would log "unregistered
    task" and drop the message, and that rollback would wait for the sweep.
    Nothing queues it any more; it can go once no worker from before may
    have left such a message behind."""
    advance_release(release_id)


@shared_task
def sweep() -> dict:
    result = engine.sweep()
    for release_id in result["nudge"]:
        nudge(release_id)
    return {**result, "nudge": len(result["nudge"])}


@shared_task
def clean_up() -> dict:
    """Baked images beyond each environment's last N, deleted with their snapshots."""
    return cleanup.clean_up()
