"""The only way a release or a step changes status: one table of moves, and
a conditional update per move.

`RELEASE_MOVES` and `STEP_MOVES` say, for each status, which actions are
allowed and where they lead. Services, the engine, the API and the page's
buttons read them here and nowhere else. A move updates the row only if it is
still in the status the move starts from (and, for a leased step, still
held by the caller); when no row changes, another worker process got there
first and the caller backs off. Every move is also a `StatusChange` row
(from, to, reason, who), and status events go out to the browser after the
commit, never before. A move that people are told about (a gate opens or is
decided, a release ends or fails) records its notification in the same
transaction (releases/notifications.py: an outbox).
"""

from __future__ import annotations

from django.db import transaction

from . import broadcast, notifications, plan
from .models import Release, StatusChange, Step

R, S = Release.Status, Step.Status

# status -> {action: next status}
RELEASE_MOVES: dict[str, dict[str, str]] = {
    R.QUEUED: {"start": R.RUNNING, "cancel": R.ROLLING_BACK},
    R.RUNNING: {
        "open_gate": R.AWAITING_APPROVAL, "fail": R.FAILED, "finish": R.SUCCEEDED,
        "cancel": R.ROLLING_BACK,  # by the engine, once the step at work has stopped
    },
    R.AWAITING_APPROVAL: {
        "approve": R.RUNNING, "reject": R.ROLLING_BACK, "expire": R.ROLLING_BACK,
        "cancel": R.ROLLING_BACK, "rollback": R.ROLLING_BACK,
    },
    R.FAILED: {"retry": R.RUNNING, "cancel": R.ROLLING_BACK, "rollback": R.ROLLING_BACK},
    R.SUCCEEDED: {"rollback": R.ROLLING_BACK},
    R.ROLLING_BACK: {
        "rolled_back": R.ROLLED_BACK,
        "cancelled": R.CANCELLED,  # the rollback of a cancel ends as cancelled
        "fail": R.FAILED,  # the rollback itself failed: roll back again
    },
    R.CANCELLED: {},
    R.ROLLED_BACK: {},
}
STEP_MOVES: dict[str, dict[str, str]] = {
    S.PENDING: {"start": S.RUNNING, "open": S.AWAITING_APPROVAL, "skip": S.SKIPPED},
    S.RUNNING: {
        "succeed": S.SUCCEEDED, "fail": S.FAILED, "cancel": S.FAILED,
        "requeue": S.PENDING,  # its worker stopped renewing its lease, or lost the database
    },
    S.AWAITING_APPROVAL: {"approve": S.SUCCEEDED, "reject": S.FAILED, "expire": S.FAILED, "close": S.FAILED},
    S.FAILED: {"retry": S.PENDING},
    S.SUCCEEDED: {},
    S.SKIPPED: {},
}
# What a person may ask of a release (the page shows a button for each that its status allows).
PERSON_ACTIONS = ("cancel", "retry", "rollback")
TERMINAL = tuple(status for status, moves in RELEASE_MOVES.items() if not moves)
ENDINGS = {R.SUCCEEDED, R.ROLLED_BACK, R.CANCELLED}


def allows(status: str, action: str, *, table: dict = RELEASE_MOVES) -> bool:
    return action in table.get(status, {})


def statuses_allowing(action: str, *, table: dict = RELEASE_MOVES) -> tuple[str, ...]:
    return tuple(status for status, moves in table.items() if action in moves)


def person_actions(status: str) -> set[str]:
    return {action for action in PERSON_ACTIONS if allows(status, action)}


def too_late_to_cancel(steps) -> bool:
    """Whether a release with these steps is past the point where a cancel
    is possible: `plan.CANCEL_ENDS_AT` has started (a status alone cannot
    say it; the release is `running` before and after)."""
    return any(s.key == plan.CANCEL_ENDS_AT and s.kind == Step.Kind.ACTION and (s.status != S.PENDING or s.attempts)
               for s in steps)


def too_late_to_cancel_reason(release_id: int) -> str:
    return (f"release {release_id} is past its swap: the new fleet serves and the old one is being stopped "
            f"({plan.CANCEL_ENDS_AT}), so it can no longer be cancelled; roll it back instead "
            f"(Roll back is offered once {plan.CANCEL_ENDS_AT} ends)")


def _move(model, table, pk: int, action: str, *, extra_filter: dict, release_id, step_id, reason: str, actor,
          fields: dict) -> StatusChange | None:
    from django.utils import timezone

    # Read, then update only if still there: a race costs a second look, never a wrong move.
    for _ in range(3):
        current = model.objects.filter(pk=pk, **extra_filter).values_list("status", flat=True).first()
        if current is None or action not in table.get(current, {}):
            return None
        to = table[current][action]
        values = dict(fields)
        if model is Release and to in ENDINGS:
            values.setdefault("finished_at", timezone.now())
        if model.objects.filter(pk=pk, status=current, **extra_filter).update(status=to, **values):
            return StatusChange.objects.create(
                release_id=release_id if release_id is not None else pk, step_id=step_id, action=action,
                from_status=current, to_status=to, reason=reason[:2000], actor=actor,
                actor_name=actor.get_username() if actor is not None else "greenlight",
            )
    return None


def release(release_id: int, action: str, *, reason: str = "", actor=None, **fields) -> bool:
    """Move a release by `action` if its status allows it; False if it does not (any more)."""
    with transaction.atomic():
        changed = _move(Release, RELEASE_MOVES, release_id, action, extra_filter={}, release_id=release_id,
                        step_id=None, reason=reason, actor=actor, fields=fields)
        if changed:
            notifications.release_moved(release_id, action, changed.to_status, change=changed, actor=actor)
    if changed:
        transaction.on_commit(lambda: broadcast.release_changed(release_id))
    return changed is not None


def step(step_id: int, action: str, *, held_by: str | None = None, reason: str = "", actor=None,
         release_id: int | None = None, comment: str | None = None, **fields) -> bool:
    """Move a step by `action`; `held_by`: only if this worker still holds its lease.
    `release_id`: the step's release, when the caller knows it (one query fewer).
    `comment`: a gate decision's comment, for its notification (else read from `reason`)."""
    if release_id is None:
        release_id = Step.objects.values_list("release_id", flat=True).filter(pk=step_id).first()
        if release_id is None:
            return False
    extra = {"lease_owner": held_by} if held_by is not None else {}
    with transaction.atomic():
        changed = _move(Step, STEP_MOVES, step_id, action, extra_filter=extra, release_id=release_id,
                        step_id=step_id, reason=reason, actor=actor, fields=fields)
        if changed:
            notifications.step_moved(step_id, release_id, action, change=changed, reason=reason, actor=actor, comment=comment)
    if changed:
        transaction.on_commit(lambda: broadcast.step_changed(release_id, step_id))
    return changed is not None


def created(release_obj: Release, *, actor=None) -> None:
    """The first row of a release's history: it exists, queued."""
    StatusChange.objects.create(release=release_obj, action="create", from_status="", to_status=release_obj.status,
                                actor=actor, actor_name=actor.get_username() if actor is not None else "greenlight")


def assign(step_id: int, assignee, *, release_id: int) -> bool:
    """Give an open gate a taker ("Assign to me"), or none: not a move and not a lock, but
    conditional like one (only while the gate is open), and shown to everyone watching."""
    changed = Step.objects.filter(pk=step_id, status=S.AWAITING_APPROVAL).update(assignee=assignee)
    if changed:
        gate_changed(release_id, step_id)
    return bool(changed)


def gate_changed(release_id: int, step_id: int) -> None:
    """An open gate changed without moving (an approval short of the number needed, a taker):
    the pages watching it redraw its card once the change is committed."""
    transaction.on_commit(lambda: broadcast.step_changed(release_id, step_id))
