"""The only way a release or a step changes status: a conditional update.

Each function updates the row only if it is still in one of the expected
statuses (and, for a leased step, still held by the caller). When no row
changes, another worker process got there first and the caller backs off.
Status events go out to the browser after the commit, never before.
"""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from . import broadcast
from .models import Release, Step


def release(release_id: int, *, from_: tuple, to: str, **fields) -> bool:
    if to in (Release.Status.SUCCEEDED, Release.Status.ROLLED_BACK, Release.Status.CANCELLED):
        fields.setdefault("finished_at", timezone.now())
    changed = Release.objects.filter(pk=release_id, status__in=from_).update(status=to, **fields)
    if changed:
        transaction.on_commit(lambda: broadcast.release_changed(release_id))
    return bool(changed)


def step(step_id: int, *, from_: tuple, to: str, held_by: str | None = None, **fields) -> bool:
    """`held_by`: only if this worker still holds the step's lease."""
    rows = Step.objects.filter(pk=step_id, status__in=from_)
    if held_by is not None:
        rows = rows.filter(lease_owner=held_by)
    changed = rows.update(status=to, **fields)
    if changed:
        release_id = Step.objects.values_list("release_id", flat=True).get(pk=step_id)
        transaction.on_commit(lambda: broadcast.step_changed(release_id, step_id))
    return bool(changed)
