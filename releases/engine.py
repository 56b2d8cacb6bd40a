"""Runs a release, one step at a time, and rolls it back.

A worker takes a step only by leasing its row (a conditional update); while
the step runs, a heartbeat extends the lease; a periodic sweep hands steps
whose worker died back to the queue and closes gates past their deadline.
Celery messages are nudges: `advance` re-reads the release and does nothing
unless there is something to do, so a message that arrives twice is harmless.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import traceback
from datetime import timedelta

from django.db import close_old_connections, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from deployer import aws
from deployer.errors import AdapterError

from . import audit, steps, transitions
from .logs import LogWriter
from .models import Environment, Release, Step

log = logging.getLogger(__name__)
LEASE = timedelta(seconds=60)
HEARTBEAT_SECONDS = 10
S, R = Step.Status, Release.Status


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


class Heartbeat:
    """Extends a lease while the work runs, from a thread of its own."""

    def __init__(self, rows, field: str):
        self.rows, self.field = rows, field  # the leased row (still ours), and its expiry column
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        try:
            while not self.stop.wait(HEARTBEAT_SECONDS):
                self.rows.update(**{self.field: timezone.now() + LEASE})
        finally:
            connection.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def account_for(settings: dict) -> aws.Account:
    """`settings`: a release's frozen environment, or `plan.settings_of(environment)`."""
    return aws.Account.from_reference(settings["region"], settings["aws_endpoint_url"], settings["aws_credentials"])


def cloud_for(settings: dict, on_mutation=None) -> aws.Cloud:
    return aws.Cloud(account_for(settings), load_balancer_name=settings["load_balancer_name"],
                     target_group_arn=settings["target_group_arn"], on_mutation=on_mutation)


def release_cloud(release: Release) -> aws.Cloud:
    """The release's cloud, every mutation audited against the release."""

    def on_mutation(action: str, resource: str, request_id: str) -> None:
        audit.record(f"aws:{action}", target=resource, release=release, request_id=request_id)

    return cloud_for(release.plan["environment"], on_mutation)


def secrets_of(release: Release) -> list[str]:
    """Values the log must never show: the environment's own secrets."""
    try:
        account = account_for(release.plan["environment"])
    except AdapterError:
        return []
    return [s for s in (account.secret_access_key, account.access_key_id) if s and s != "sandbox"]


def advance(release_id: int) -> None:
    """Run the release's steps until a gate, a failure, the end, or a cancel."""
    owner = worker_id()
    while True:
        close_old_connections()
        release = Release.objects.select_related("environment").get(pk=release_id)
        if release.status not in (R.QUEUED, R.RUNNING):
            return
        step = release.steps.exclude(status__in=(S.SUCCEEDED, S.SKIPPED)).first()
        if release.cancel_requested:
            if step is None or step.status != S.RUNNING:
                if transitions.release(release.pk, from_=(R.QUEUED, R.RUNNING), to=R.ROLLING_BACK):
                    rollback(release.pk)
            return
        if step is None:
            finish(release)
            return
        if step.kind == Step.Kind.GATE:
            open_gate(release, step)
            return
        if step.status != S.PENDING:
            return  # running elsewhere (the sweep re-queues it if that worker died), or failed
        leased = transitions.step(
            step.pk,
            from_=(S.PENDING,),
            to=S.RUNNING,
            lease_owner=owner,
            lease_expires_at=timezone.now() + LEASE,
            started_at=timezone.now(),
            finished_at=None,
            error="",
            attempts=F("attempts") + 1,
        )
        if not leased:
            return  # another worker process got there first
        transitions.release(release.pk, from_=(R.QUEUED,), to=R.RUNNING)
        if not run_step(release, Step.objects.get(pk=step.pk), owner):
            return


def run_step(release: Release, step: Step, owner: str) -> bool:
    """Run one leased step; True if it succeeded and the release may go on."""
    writer = LogWriter(release.pk, secrets=secrets_of(release))
    writer.write(step.key, f"{step.key} started (attempt {step.attempts})")
    context = None
    try:
        with Heartbeat(Step.objects.filter(pk=step.pk, lease_owner=owner, status=S.RUNNING), "lease_expires_at"):
            context = steps.Context(release=release, step=step, cloud=release_cloud(release), log=writer)
            result = steps.ACTIONS[step.key](context) or {}
    except steps.Cancelled:
        writer.write(step.key, "cancelled", stream="stderr")
        writer.flush()
        transitions.step(step.pk, from_=(S.RUNNING,), to=S.FAILED, held_by=owner, error="cancelled", finished_at=timezone.now())
        if transitions.release(release.pk, from_=(R.RUNNING,), to=R.ROLLING_BACK):
            rollback(release.pk)
        return False
    except (AdapterError, steps.StepFailed) as exc:
        return fail(release, step, owner, writer, str(exc))
    except Exception as exc:
        log.exception("step %s of release %s crashed", step.key, release.pk)
        writer.write(step.key, traceback.format_exc(limit=3), stream="stderr")
        return fail(release, step, owner, writer, f"internal error: {type(exc).__name__}: {exc}")
    writer.write(step.key, f"{step.key} succeeded")
    writer.flush()
    return transitions.step(step.pk, from_=(S.RUNNING,), to=S.SUCCEEDED, held_by=owner, result=result, finished_at=timezone.now())


def fail(release: Release, step: Step, owner: str, writer: LogWriter, reason: str) -> bool:
    reason = writer.redact(reason)  # the error is shown on the page and in the API too
    writer.write(step.key, f"{step.key} failed: {reason}", stream="stderr")
    writer.flush()
    with transaction.atomic():
        if transitions.step(step.pk, from_=(S.RUNNING,), to=S.FAILED, held_by=owner, error=reason, finished_at=timezone.now()):
            transitions.release(release.pk, from_=(R.RUNNING,), to=R.FAILED, error=f"{step.key}: {reason}")
    return False


def open_gate(release: Release, step: Step) -> None:
    if step.status != S.PENDING:
        return
    context = steps.Context(release=release, step=step, cloud=release_cloud(release), log=LogWriter(release.pk))
    try:
        card = steps.GATE_CARDS[step.key](context)
    except AdapterError as exc:
        card = {"warning": str(exc)}
    timeout = release.plan["environment"]["gate_timeout"]
    with transaction.atomic():
        opened = transitions.step(step.pk, from_=(S.PENDING,), to=S.AWAITING_APPROVAL, started_at=timezone.now(),
                                  deadline=timezone.now() + timedelta(seconds=timeout), result=card)
        if opened:
            transitions.release(release.pk, from_=(R.QUEUED, R.RUNNING), to=R.AWAITING_APPROVAL)
    if opened:  # a second nudge that lost the race says nothing
        context.log.write(step.key, f"waiting for approval: {step.key}")
        context.log.flush()


def finish(release: Release) -> None:
    image = release.state.get("image")
    with transaction.atomic():
        if transitions.release(release.pk, from_=(R.RUNNING,), to=R.SUCCEEDED, error="") and image:
            Environment.objects.filter(pk=release.environment_id).update(last_baked_ami=image)
    writer = LogWriter(release.pk)
    writer.write("release", f"{release.plan['environment']['name']} now serves {release.revision}")
    writer.flush()


def rollback(release_id: int) -> None:
    """Put the old fleet back in service, then take the new one out."""
    close_old_connections()
    owner, now = worker_id(), timezone.now()
    free = Q(rollback_lease_until__isnull=True) | Q(rollback_lease_until__lt=now)
    if not Release.objects.filter(free, pk=release_id, status=R.ROLLING_BACK).update(
            rollback_owner=owner, rollback_lease_until=now + LEASE):
        return  # not rolling back, or another worker process is at it
    release = Release.objects.get(pk=release_id)
    # from here on the release can only be rolled back (again), never resumed
    release.state["rolled_back"] = True
    Release.objects.filter(pk=release.pk).update(state=release.state)
    writer = LogWriter(release.pk, secrets=secrets_of(release))
    try:
        with Heartbeat(Release.objects.filter(pk=release.pk, rollback_owner=owner), "rollback_lease_until"):
            steps.roll_back(steps.Context(release=release, step=None, cloud=release_cloud(release), log=writer))
    except AdapterError as exc:
        writer.write("rollback", f"rollback failed: {exc}", stream="stderr")
        writer.flush()
        transitions.release(release.pk, from_=(R.ROLLING_BACK,), to=R.FAILED, error=writer.redact(f"rollback: {exc}"),
                            rollback_lease_until=None)
        return
    writer.flush()
    release.refresh_from_db()
    transitions.release(release.pk, from_=(R.ROLLING_BACK,), to=R.CANCELLED if release.cancel_requested else R.ROLLED_BACK,
                        rollback_lease_until=None)


def sweep() -> dict:
    """Re-queue steps whose worker died; reject gates past their deadline;
    terminate old instances past their retention; nudge stalled releases."""
    from . import services, tasks

    now = timezone.now()
    requeued = expired = terminated = 0
    for step in Step.objects.filter(status=S.RUNNING, lease_expires_at__lt=now):
        if transitions.step(step.pk, from_=(S.RUNNING,), to=S.PENDING, held_by=step.lease_owner, lease_owner=""):
            LogWriter(step.release_id).write(step.key, f"{step.key}: its worker stopped answering; running it again")
            requeued += 1
            tasks.advance_release.delay(step.release_id)
    for step in Step.objects.filter(status=S.AWAITING_APPROVAL, deadline__lt=now).select_related("release"):
        try:
            services.gate_expire(release=step.release, key=step.key)
            expired += 1
        except services.ServiceError:
            pass
    for release in Release.objects.filter(status__in=(R.QUEUED, R.RUNNING)).exclude(steps__status=S.RUNNING):
        tasks.advance_release.delay(release.pk)
    for release in Release.objects.filter(status=R.ROLLING_BACK, rollback_lease_until__lt=now):
        LogWriter(release.pk).write("rollback", "the rollback's worker stopped answering; starting it again")
        tasks.rollback_release.delay(release.pk)
    for release in Release.objects.filter(status=R.SUCCEEDED, finished_at__isnull=False):
        retention = timedelta(seconds=release.plan["environment"]["retention"])
        if release.finished_at + retention < now and release.state.get("old") and not release.state.get("old_terminated"):
            try:
                release_cloud(release).terminate(release.state["old"])
            except AdapterError as exc:
                log.warning("cannot terminate the old instances of release %s: %s", release.pk, exc)
                continue
            release.state["old_terminated"] = True
            Release.objects.filter(pk=release.pk).update(state=release.state)
            terminated += 1
    return {"requeued": requeued, "expired": expired, "terminated": terminated}

