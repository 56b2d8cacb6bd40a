"""Runs a release, one step at a time, and rolls it back.

A worker takes a step only by leasing its row (a conditional update); while
the step works, a heartbeat extends the lease (LEASE_SECONDS, renewed every
third of it). The lease is also a fence: a worker that was paused or cut off
past its lease may find another worker running its step, so the step checks
the lease before every AWS mutation, before and during every command, and
before it records any outcome; a worker that lost it stops quietly and
writes nothing to the step. A step that waits on AWS does
not sleep in the worker: it records what it waits for, its deadline and when
to look again (`wake_at`), gives up its lease, and `advance` returns the
seconds until then so the Celery task can queue itself again with that
countdown; the sweep is the safety net for a countdown that never arrives.
A rollback is more steps (the plan's undo steps) run by the same loop.

Celery messages are nudges: `advance` re-reads the release and does nothing
unless there is something to do, so a message that arrives twice is
harmless. Nothing here queues tasks or calls services: the tasks call this.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import traceback
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import (DatabaseError, IntegrityError, InterfaceError, OperationalError, close_old_connections, connection,
                       transaction)
from django.db.models import F, Q
from django.utils import timezone

from deployer import aws, git
from deployer.errors import AdapterError

from . import audit, broadcast, cleanup, notifications, plan, steps, transitions
from .logs import LogWriter
from .models import Environment, Release, Step

log = logging.getLogger(__name__)
S, R, K = Step.Status, Release.Status, Step.Kind
GO_ON = "go on"  # run_step's answer when the release may take its next step at once


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def lease_term() -> timedelta:
    return timedelta(seconds=settings.LEASE_SECONDS)


class Heartbeat:
    """Extends a lease while the work runs, from a thread of its own, every
    third of LEASE_SECONDS. A renewal that finds the row no longer ours (the
    sweep handed it back, another worker holds it) sets `lost` and stops:
    the step sees it at its next check."""

    def __init__(self, rows, field: str, lost: threading.Event | None = None):
        self.rows, self.field = rows, field  # the leased row (still ours), and its expiry column
        self.stop = threading.Event()
        self.lost = lost or threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        try:
            while not self.stop.wait(settings.LEASE_SECONDS / 3):
                try:
                    renewed = self.rows.update(**{self.field: timezone.now() + lease_term()})
                except DatabaseError as exc:
                    # the database is away (a restart): try again next beat; if it stays away past
                    # the lease, the sweep hands the step on and the step's own checks stop it
                    log.warning("cannot renew a lease (%s); trying again", type(exc).__name__)
                    connection.close()
                    continue
                if not renewed:
                    self.lost.set()
                    return
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


def cloud_for(settings: dict, on_mutation=None, before_mutation=None) -> aws.Cloud:
    return aws.Cloud(account_for(settings), load_balancer_name=settings["load_balancer_name"],
                     target_group_arn=settings["target_group_arn"], on_mutation=on_mutation,
                     before_mutation=before_mutation)


def release_cloud(release: Release, before_mutation=None) -> aws.Cloud:
    """The release's cloud, every mutation audited against the release;
    `before_mutation` (a step's lease check) may stop one before it is sent."""

    def on_mutation(action: str, resource: str, request_id: str) -> None:
        audit.record(f"aws:{action}", target=resource, release=release, request_id=request_id)

    return cloud_for(release.plan["environment"], on_mutation, before_mutation)


def secrets_of(release: Release) -> list[str]:
    """Values the log must never show, beside the worker's own (deployer.redact):
    the environment's credentials, its SSH private key file's content, and the
    password or token in its repository's URL (the deploy step clones it on
    the instances, and git may print it there)."""
    environment = release.plan.get("environment") or {}
    found = git.secrets(environment.get("repository") or "")
    try:
        found += aws.credential_values(account_for(environment))
    except (AdapterError, KeyError):
        pass
    if key_file := environment.get("ssh_key_file"):
        try:
            found.append(Path(key_file).read_text())
        except (OSError, ValueError):
            pass  # the step that needs it says why
    return [s for s in found if s and s not in aws.SANDBOX_CREDENTIALS]


def writer_for(release: Release) -> LogWriter:
    return LogWriter(release.pk, secrets=secrets_of(release))


def poll_delay(polls: int, *, scale: float, hint: float | None = None) -> float:
    """Seconds until the next look: backing off from WAIT_POLL_MIN to
    WAIT_POLL_MAX (AWS seconds, times the cloud's time scale), never slower
    than `hint`, with jitter so that many waiting releases do not call AWS
    in step."""
    delay = min(settings.WAIT_POLL_MIN * 1.5**polls, settings.WAIT_POLL_MAX) * scale
    if hint:
        delay = min(delay, hint)
    return max(delay * random.uniform(0.8, 1.2), settings.WAIT_POLL_FLOOR)


# -- the loop ------------------------------------------------------------------------


def advance(release_id: int) -> float | None:
    """Do what the release needs now. Returns the seconds until it wants to
    be nudged again (a step is waiting on AWS), or None."""
    owner = worker_id()
    fresh = True
    while True:
        if fresh or connection.errors_occurred:
            # A task's first look gets a connection of its own, as a request does (CONN_MAX_AGE 0
            # closes it), and so does a look after a database error. Between two steps the
            # connection has just worked (the last step's outcome was written through it):
            # it is kept, not opened again (a new PostgreSQL backend costs milliseconds).
            close_old_connections()
            fresh = False
        release = Release.objects.select_related("environment").filter(pk=release_id).first()
        if release is None:
            return None
        if release.status in (R.QUEUED, R.RUNNING):
            if release.cancel_requested and not transitions.too_late_to_cancel(release.steps.all()):
                if not stop_for_cancel(release):
                    return None  # the worker at work sees the flag and stops
                continue
            step = release.steps.filter(kind__in=(K.ACTION, K.GATE)).exclude(status__in=(S.SUCCEEDED, S.SKIPPED)).first()
            if step is None:
                finish(release)
                return None
            if step.kind == K.GATE:
                open_gate(release, step)
                return None
        elif release.status == R.ROLLING_BACK:
            step = next_rollback_step(release)
            if step is None:
                end_rollback(release)
                return None
        else:
            return None
        outcome = take(release, step, owner)
        if outcome != GO_ON:
            return outcome


def take(release: Release, step: Step, owner: str):
    """Lease the step if it is due, and run it."""
    now = timezone.now()
    if step.status == S.PENDING:
        leased = transitions.step(step.pk, "start", release_id=release.pk, lease_owner=owner, lease_expires_at=now + lease_term(),
                                  started_at=now, finished_at=None, error="", waiting_for="", attempts=F("attempts") + 1)
        if leased and release.status == R.QUEUED:  # "start" moves only a queued release: no look for a running one
            transitions.release(release.pk, "start")
        resumed = False
    elif step.status == S.RUNNING and not step.lease_owner:
        if step.wake_at and step.wake_at > now:
            return None  # an early nudge: its countdown is on the way
        leased = Step.objects.filter(Q(wake_at__isnull=True) | Q(wake_at__lte=now), pk=step.pk, status=S.RUNNING,
                                     lease_owner="").update(lease_owner=owner, lease_expires_at=now + lease_term(), wake_at=None)
        resumed = True
    else:
        return None  # at work elsewhere (the sweep re-queues it if that worker died), or failed
    if not leased:
        return None  # another worker process got there first
    return run_step(release, Step.objects.get(pk=step.pk), owner, resumed=resumed)


def run_step(release: Release, step: Step, owner: str, *, resumed: bool = False):
    """Run one leased step: GO_ON when it succeeded, seconds when it waits, else None."""
    writer = writer_for(release)
    try:
        with writer:
            return _run_step(release, step, owner, writer, resumed=resumed)
    except DATABASE_GONE as exc:
        return database_lost(step, owner, writer, exc)


# The database went away under a step: a restart, a failover, a cut connection.
DATABASE_GONE = (OperationalError, InterfaceError)
DATABASE_RETRIES = (0.5, 1, 2, 4)  # seconds before each try to hand the step back


def database_lost(step: Step, owner: str, writer: LogWriter, exc: Exception):
    """Hand the step back, saying why, as soon as the database answers again,
    and go on: the step runs again at once, as after a worker's crash (it
    adopts what it made). What it did before the cut may or may not be
    recorded, so running it again is the only safe answer. If the database
    stays away longer than these few tries, the lease runs out and the sweep
    takes the step back; the task ends with the error."""
    reason = f"the connection to the database was lost ({type(exc).__name__})"
    log.warning("step %s of release %s: %s; handing it back once the database answers", step.key, step.release_id, reason)
    for pause in DATABASE_RETRIES:
        time.sleep(pause)
        connection.close()
        try:
            if transitions.step(step.pk, "requeue", held_by=owner, lease_owner="", reason=reason,
                                waiting_for=f"a worker to run it again: {reason}"[:300]):
                writer.write(step.key, f"{step.key}: {reason}; running it again", stream="stderr")
            writer.close()  # with whatever the step wrote before the cut
            return GO_ON
        except DATABASE_GONE:
            continue
    log.warning("step %s of release %s: the database is still away; the sweep takes the step back when its lease "
                "runs out", step.key, step.release_id)
    raise exc


def _run_step(release: Release, step: Step, owner: str, writer: LogWriter, *, resumed: bool):
    if not resumed:
        writer.write(step.key, f"{step.key} started (attempt {step.attempts})")
    lease = steps.Lease(step.pk, owner)
    try:
        with Heartbeat(lease.rows(), "lease_expires_at", lease.lost):
            context = steps.Context(release=release, step=step, cloud=release_cloud(release, lease.check), log=writer,
                                    lease=lease)
            result = steps.ACTIONS[step.key](context) or {}
    except steps.LeaseLost:
        return lost(release, step, owner)
    except steps.Wait as wait:
        if not lease.held():
            return lost(release, step, owner)
        if cancelling(release, step):
            return cancel_step(release, step, owner, writer)  # cancelled while it looked: stop now, not at the next look
        return sleep(release, step, owner, writer, wait)
    except steps.Cancelled:
        if not lease.held():
            return lost(release, step, owner)
        return cancel_step(release, step, owner, writer)
    except (AdapterError, steps.StepFailed) as exc:
        if not lease.held():
            return lost(release, step, owner)
        if cancelling(release, step):
            return cancel_step(release, step, owner, writer)  # it failed because it was cancelled
        return fail(release, step, owner, writer, str(exc))
    except DATABASE_GONE:
        raise  # not the step's fault: run_step hands it back
    except Exception as exc:
        if not lease.held():
            return lost(release, step, owner)
        log.exception("step %s of release %s crashed", step.key, release.pk)
        writer.write(step.key, traceback.format_exc(limit=3), stream="stderr")
        return fail(release, step, owner, writer, f"internal error: {type(exc).__name__}: {exc}")
    if not lease.held():
        return lost(release, step, owner)
    writer.write(step.key, f"{step.key} succeeded")
    writer.flush()
    done = transitions.step(step.pk, "succeed", release_id=release.pk, held_by=owner, result=result, finished_at=timezone.now(),
                            waiting_for="", wake_at=None, wait={}, deadline=None)
    return GO_ON if done else None


def lost(release: Release, step: Step, owner: str) -> None:
    """This worker no longer holds the step (it was paused or cut off past
    its lease, and the step was handed on): whoever holds it now goes on.
    Nothing is written to the step or its release."""
    log.warning("step %s of release %s: %s lost its lease; stopping without recording anything", step.key, release.pk, owner)
    return None


def cancelling(release: Release, step: Step) -> bool:
    """Whether a person cancelled the release while this plan step ran (a rollback step is not cancellable)."""
    if step.kind == K.ROLLBACK or not Release.objects.filter(pk=release.pk, cancel_requested=True).exists():
        return False
    return not transitions.too_late_to_cancel(release.steps.all())


def sleep(release: Release, step: Step, owner: str, writer: LogWriter, wait: steps.Wait) -> float | None:
    """Give the lease up until the wait is due to be looked at again."""
    now = timezone.now()
    current = step.wait or {}
    if current.get("key") == wait.key:
        since, polls = datetime.fromisoformat(current["since"]), current.get("polls", 0) + 1
    else:
        since, polls = now, 0
        writer.write(step.key, f"waiting for {wait.text} (up to {wait.timeout:g}s)")
    deadline = since + timedelta(seconds=wait.timeout)
    if now >= deadline:
        return fail(release, step, owner, writer, f"gave up after {wait.timeout:g}s waiting for {wait.text}")
    scale = float(release.plan["environment"].get("time_scale", 1.0))
    # a timer still looks in now and then, so a countdown is never hours long
    delay = min(wait.at, 10 * settings.WAIT_POLL_MAX * scale) if wait.at is not None else poll_delay(polls, scale=scale, hint=wait.poll)
    delay = max(min(delay, (deadline - now).total_seconds() + 0.05), settings.WAIT_POLL_FLOOR)
    writer.flush()
    slept = Step.objects.filter(pk=step.pk, status=S.RUNNING, lease_owner=owner).update(
        lease_owner="", lease_expires_at=None, waiting_for=writer.redact(wait.text)[:300], deadline=deadline,
        wake_at=now + timedelta(seconds=delay), wait={"key": wait.key, "since": since.isoformat(), "polls": polls})
    if not slept:
        return None  # the lease was lost meanwhile; whoever holds it goes on
    if step.waiting_for != wait.text:
        transaction.on_commit(lambda: broadcast.step_changed(release.pk, step.pk))
    return delay


def cancel_step(release: Release, step: Step, owner: str | None, writer: LogWriter):
    """Stop the step a person cancelled; the release rolls back from here.
    Said in the log only when this call stopped it (a worker may have taken
    the step off its timer a moment before)."""
    with transaction.atomic():
        stopped = transitions.step(step.pk, "cancel", release_id=release.pk, held_by=owner if owner is not None else "", error="cancelled",
                                   reason="cancelled", finished_at=timezone.now(), waiting_for="", wake_at=None)
        if stopped:
            transitions.release(release.pk, "cancel", reason="cancelled")
    if stopped:
        writer.write(step.key, "cancelled", stream="stderr")
        writer.flush()
    return GO_ON if stopped else None


def stop_for_cancel(release: Release) -> bool:
    """A cancelled release that is not at work: off to its rollback. False
    when a worker is at work on a step; it sees the flag and stops itself."""
    step = release.steps.filter(kind=K.ACTION, status=S.RUNNING).first()
    if step is not None:
        if step.lease_owner:
            return False
        # waiting on a timer: nobody holds it, so it is ours to stop
        return cancel_step(release, step, None, writer_for(release)) == GO_ON
    transitions.release(release.pk, "cancel", reason="cancelled")
    return True


def fail(release: Release, step: Step, owner: str, writer: LogWriter, reason: str) -> None:
    reason = writer.redact(reason)  # the error is shown on the page and in the API too
    with transaction.atomic():
        failed = transitions.step(step.pk, "fail", release_id=release.pk, held_by=owner, error=reason, reason=reason, finished_at=timezone.now(),
                                  waiting_for="", wake_at=None)
        if failed:
            transitions.release(release.pk, "fail", error=f"{step.key}: {reason}", reason=f"{step.key} failed")
    if failed:  # else the lease was lost meanwhile, and the step is someone else's to report
        writer.write(step.key, f"{step.key} failed: {reason}", stream="stderr")
        writer.flush()
    return None


def open_gate(release: Release, step: Step) -> None:
    if step.status != S.PENDING:
        return
    # the gate starts now: its card (smoke checks, instances from AWS) is its own
    # work, and can take seconds on AWS; it is not time between two steps
    started = timezone.now()
    context = steps.Context(release=release, step=step, cloud=release_cloud(release), log=writer_for(release))
    try:
        card = steps.GATE_CARDS[step.key](context)
    except (AdapterError, steps.StepFailed) as exc:
        card = {"warning": context.log.redact.text(str(exc))}
    timeout = release.plan["environment"]["gate_timeout"]
    with transaction.atomic():
        opened = transitions.step(step.pk, "open", release_id=release.pk, started_at=started,
                                  deadline=timezone.now() + timedelta(seconds=timeout), result=card)
        if opened:
            transitions.release(release.pk, "open_gate", reason=f"{step.key} is open")
    if opened:  # a second nudge that lost the race says nothing
        context.log.write(step.key, f"waiting for approval: {step.key}")
        context.log.flush()


def expire_gate(step: Step) -> bool:
    """A gate past its deadline rejects itself, and the release rolls back."""
    reason = "nobody decided before the gate's deadline"
    with transaction.atomic():
        if not transitions.step(step.pk, "expire", error=reason, reason=reason, finished_at=timezone.now()):
            return False
        transitions.release(step.release_id, "expire", error=f"{step.key}: timed out", reason=f"{step.key} timed out")
        audit.record("gate.expire", release=step.release, target=f"release {step.release_id} {step.key}")
    return True


def finish(release: Release) -> None:
    image = release.state.get("image")
    with transaction.atomic():
        if transitions.release(release.pk, "finish", error="") and image:
            Environment.objects.filter(pk=release.environment_id).update(last_baked_ami=image)
    writer = writer_for(release)
    writer.write("release", f"{release.plan['environment']['name']} now serves {release.revision}")
    writer.flush()


# -- rollback ---------------------------------------------------------------------------


def next_rollback_step(release: Release) -> Step | None:
    """The first undo step not done; the undo steps are made on first need,
    from the plan steps that started, and a failed one is tried again (the
    release is rolling back again because a person asked)."""
    undo = list(release.steps.filter(kind=K.ROLLBACK))
    if not undo:
        started = [s.key for s in release.steps.filter(kind=K.ACTION).exclude(status=S.PENDING, attempts=0)]
        keys = plan.rollback_steps(started)
        try:
            Step.objects.bulk_create([Step(release=release, position=plan.ROLLBACK_POSITION + n, key=key, kind=K.ROLLBACK)
                                      for n, key in enumerate(keys)])
        except IntegrityError:
            pass  # another worker made them a moment ago
        writer = writer_for(release)
        writer.write("rollback", f"rolling back: {', '.join(keys) or 'nothing to undo'}")
        writer.flush()
        undo = list(release.steps.filter(kind=K.ROLLBACK))
    step = next((s for s in undo if s.status != S.SUCCEEDED), None)
    if step is not None and step.status == S.FAILED:
        transitions.step(step.pk, "retry", reason="rolling back again", error="", lease_owner="", wait={}, deadline=None)
        step.refresh_from_db()
    return step


def end_rollback(release: Release) -> None:
    action = "cancelled" if release.cancel_requested else "rolled_back"
    if transitions.release(release.pk, action, reason="the old fleet serves"):
        writer = writer_for(release)
        writer.write("rollback", "rolled back" if action == "rolled_back" else "cancelled and cleaned up")
        writer.flush()


# -- the sweep -------------------------------------------------------------------------


def sweep() -> dict:
    """Hand steps whose worker died back; remind of gates that close soon and
    reject gates past their deadline; find waits that are due; terminate what
    releases left stopped (the old fleet of a succeeded one, the new one of a
    rolled-back one) past their retention (releases/cleanup.py); take back
    notifications whose worker died mid-send.
    Returns what it did, `nudge`: the releases to advance now, and `deliver`:
    the deliveries to queue now."""
    now = timezone.now()
    nudge: set[int] = set()
    requeued = expired = 0
    deliver, notified = notifications.sweep(now)  # reminders first: a gate past its deadline is expired below
    for step in Step.objects.filter(status=S.RUNNING, lease_expires_at__lt=now).exclude(lease_owner=""):
        # the worker's own id names the machine and process that went quiet (it died, was
        # cut off, or lost the database for longer than it tries to hand the step back)
        quiet = f"its worker ({step.lease_owner}) stopped renewing its lease"
        if transitions.step(step.pk, "requeue", held_by=step.lease_owner, lease_owner="", reason=quiet,
                            waiting_for=f"a worker to run it again: {quiet}"[:300]):
            with LogWriter(step.release_id) as writer:  # written and flushed now: why attempt 2 starts
                writer.write(step.key, f"{step.key}: {quiet}; running it again", stream="stderr")
            requeued += 1
            nudge.add(step.release_id)
    for step in Step.objects.filter(status=S.AWAITING_APPROVAL, deadline__lt=now).select_related("release"):
        if expire_gate(step):
            expired += 1
            nudge.add(step.release_id)
    nudge.update(Step.objects.filter(status=S.RUNNING, lease_owner="", wake_at__lte=now).values_list("release_id", flat=True))
    nudge.update(Release.objects.filter(status__in=(R.QUEUED, R.RUNNING, R.ROLLING_BACK)).exclude(
        steps__status=S.RUNNING).values_list("pk", flat=True))
    terminated = cleanup.terminate_retired(now)
    return {"requeued": requeued, "expired": expired, "terminated": terminated, **notified, "nudge": sorted(nudge),
            "deliver": deliver}
