"""Telling people: events become Notification rows, written in the same
transaction as the change they report (an outbox), and one Delivery per
channel, sent by a Celery task with retries.

The events (docs/notifications.md shows their payload):

    gate.opened          a gate waits: the link, the revision, who started it, its deadline, who may decide
    gate.expiring        it closes itself in Environment.gate_reminder seconds (the sweep looks; once per gate)
    gate.decided         approved, rejected or expired: by whom, with the comment
    gate.assigned        someone took the gate ("Assign to me")
    release.succeeded    the environment serves the new revision
    release.failed       a step failed, with its error
    release.cancelled    a person cancelled it, and what it made is cleaned up
    release.rolled_back  the old fleet serves again
    test                 "Send test" on the environment page (to one channel, whatever its events)

transitions.py calls `release_moved` and `step_moved` inside the move's own
transaction: an event is recorded if and only if the move commits, and the
delivery task is queued once it has. An environment with no channel costs one
query per move that can be an event, and none for the others.

A delivery is claimed by a conditional update (pending -> sending, with a
lease), sent, and marked sent; a failure goes back to pending with a backoff,
and the last allowed attempt's failure is final. The sweep takes back a
delivery whose worker died mid-send (its lease ran out) and re-queues due
ones whose message was lost: at least once, and once as a rule (receivers
dedupe on X-Greenlight-Delivery).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from deployer import notify
from deployer.errors import AdapterError
from deployer.redact import Redactor

from . import permissions
from .models import Approval, Delivery, Environment, Notification, NotificationChannel, Release, StatusChange, Step

log = logging.getLogger(__name__)

EVENTS = {
    "gate.opened": "a gate waits for a decision",
    "gate.expiring": "a gate closes itself soon",
    "gate.decided": "a gate was approved, rejected or expired",
    "gate.assigned": "someone took a gate",
    "release.succeeded": "a release succeeded",
    "release.failed": "a release failed",
    "release.cancelled": "a release was cancelled",
    "release.rolled_back": "a release was rolled back",
}
TEST = "test"
# a release's status -> its event (the moves into these statuses are the events)
RELEASE_EVENTS = {
    Release.Status.SUCCEEDED: "release.succeeded",
    Release.Status.FAILED: "release.failed",
    Release.Status.CANCELLED: "release.cancelled",
    Release.Status.ROLLED_BACK: "release.rolled_back",
}
# a gate's move -> its event ("close": the release was cancelled or rolled back at the gate; that is its event)
GATE_MOVES = {"open": "gate.opened", "approve": "gate.decided", "reject": "gate.decided", "expire": "gate.decided"}
DECISIONS = {"approve": "approved", "reject": "rejected", "expire": "expired"}
GATE_RELEASE_STATUS = {"gate.opened": Release.Status.AWAITING_APPROVAL, "approved": Release.Status.RUNNING,
                       "rejected": Release.Status.ROLLING_BACK, "expired": Release.Status.ROLLING_BACK}

LEASE = timedelta(seconds=120)  # a send takes at most NOTIFY_TIMEOUT; past this its worker is taken for dead
CLOCK_SKEW = timedelta(seconds=1)  # a worker whose clock is a little behind still takes a delivery that is due
NUDGE_GRACE = timedelta(seconds=5)  # a due delivery's own message gets this long before the sweep queues another
SWEEP_BATCH = 500
ERROR_LIMIT = 500


# -- recording events ----------------------------------------------------------------------


def _subscribed(channels, event: str) -> list[NotificationChannel]:
    return [c for c in channels if not c.events or event in c.events]


def release_moved(release_id: int, action: str, to: str, *, change: StatusChange, actor=None) -> None:
    """A release moved (inside the move's transaction): its event, if the move is one."""
    event = RELEASE_EVENTS.get(to)
    if event is None:
        return
    channels = _subscribed(NotificationChannel.objects.filter(environment__releases=release_id, enabled=True), event)
    if not channels:
        return
    _guarded(lambda: _release_event(release_id, event, change=change, actor=actor, channels=channels))


def step_moved(step_id: int, release_id: int, action: str, *, change: StatusChange, reason: str = "", actor=None,
               comment: str | None = None) -> None:
    """A step moved (inside the move's transaction): a gate's opening or decision is an event."""
    event = GATE_MOVES.get(action)
    if event is None:  # only gates open and are decided: an action step's move costs nothing here
        return
    channels = _subscribed(NotificationChannel.objects.filter(environment__releases=release_id, enabled=True), event)
    if not channels:
        return
    step = Step.objects.select_related("release__environment", "release__requested_by", "assignee").get(pk=step_id)
    extra = {}
    if event == "gate.decided":
        extra = {"decision": DECISIONS[action],
                 "comment": _comment(step_id, action, reason, actor) if comment is None else comment}
    # a gate opens and is decided once (a rejected or expired one rolls its release back): once-only by the gate
    _guarded(lambda: gate_event(step, event, actor=actor, channels=channels, **extra))


def gate_event(step: Step, event: str, *, actor=None, **extra) -> Notification | None:
    """Record `event` ("gate.opened", "gate.expiring", "gate.decided", "gate.assigned") about gate
    `step`, for its environment's channels, in the caller's transaction; None when no channel wants it
    or the event was recorded before. `extra`: `decision` and `comment` for gate.decided; `key` to
    name the occurrence (the default makes it once per gate, and per assignee for gate.assigned)."""
    if event not in EVENTS or not event.startswith("gate."):
        raise ValueError(f"{event!r} is not a gate event")
    release = step.release
    channels = extra.pop("channels", None)
    if channels is None:
        channels = _subscribed(NotificationChannel.objects.filter(environment_id=release.environment_id, enabled=True), event)
    if not channels:
        return None
    key = extra.pop("key", None)
    if key is None:
        key = f"{event}:{step.pk}" + (f":{step.assignee_id or (actor.pk if actor else '')}" if event == "gate.assigned" else "")
    payload = _payload(event, release, actor=actor, gate=_gate(step, release, **extra))
    # the gate moves first, its release in the same transaction: say where the release goes
    payload["release"]["status"] = GATE_RELEASE_STATUS.get(extra.get("decision") or event, release.status)
    return record(event, key=key, environment_id=release.environment_id, release_id=release.pk, payload=payload,
                  channels=channels)


def record(event: str, *, key: str, environment_id: int | None, release_id: int | None, payload: dict,
           channels: list[NotificationChannel]) -> Notification | None:
    """The Notification and one Delivery per channel, in the caller's transaction; the
    deliveries are queued once it commits. None when `key` was recorded before."""
    now = timezone.now()
    try:
        with transaction.atomic():
            notification = Notification.objects.create(key=key[:200], event=event, environment_id=environment_id,
                                                        release_id=release_id, payload={"at": _iso(now), **payload}, at=now)
    except IntegrityError:
        return None  # told already: the key makes each event once-only
    deliveries = Delivery.objects.bulk_create([
        Delivery(notification=notification, channel=channel, channel_name=channel.name, next_attempt_at=now)
        for channel in channels
    ])
    ids = [d.pk for d in deliveries]
    transaction.on_commit(lambda: _queue(ids))
    return notification


def _queue(ids: list[int]) -> None:
    from . import tasks

    for delivery_id in ids:
        tasks.queue_delivery(delivery_id)


def _guarded(build) -> None:
    """An event is worth less than the move it reports: one that cannot be
    recorded is logged and left out (its savepoint rolled back), and the move commits."""
    try:
        with transaction.atomic():
            build()
    except Exception:
        log.exception("could not record a notification; the change itself goes on")


def _release_event(release_id: int, event: str, *, change: StatusChange, actor, channels) -> None:
    release = Release.objects.select_related("environment", "requested_by").get(pk=release_id)
    failed_step = None
    if event == "release.failed":
        step = release.steps.filter(status=Step.Status.FAILED).order_by(F("finished_at").desc(nulls_last=True), "-position").first()
        if step is not None:
            failed_step = {"key": step.key, "error": _clean(step.error)}
    payload = _payload(event, release, actor=actor, gate=None, failed_step=failed_step)
    record(event, key=f"{event}:{release.pk}:{change.pk}", environment_id=release.environment_id, release_id=release.pk,
           payload=payload, channels=channels)


def test_event(channel: NotificationChannel, *, actor) -> Delivery:
    """A "test" notification to `channel` alone (enabled or not, whatever its events), in the caller's transaction."""
    import uuid

    environment = channel.environment
    payload = {
        "event": TEST,
        "environment": _environment(environment),
        "release": None,
        "gate": None,
        "actor": actor.get_username() if actor is not None else None,
        "text": f"{environment.name}: a test from Greenlight to {channel.name}, sent by "
                f"{actor.get_username() if actor is not None else 'greenlight'}",
    }
    notification = record(TEST, key=f"test:{channel.pk}:{uuid.uuid4().hex}", environment_id=environment.pk, release_id=None,
                          payload=payload, channels=[channel])
    return notification.deliveries.get()


# -- payloads ---------------------------------------------------------------------------------


def link(path: str) -> str:
    return settings.GREENLIGHT_URL.rstrip("/") + path


def _iso(at: datetime | None) -> str | None:
    if at is None:
        return None
    return at.astimezone(dt_timezone.utc).isoformat().replace("+00:00", "Z")


def _clean(text: str) -> str:
    """Errors may quote a command's output, and comments are typed by people: both go through the
    redaction the release log uses (the worker's own secrets, and every shape of one)."""
    return Redactor().text(text) if text else ""


def _comment(step_id: int, action: str, reason: str, actor) -> str:
    # An Approval row, if the service wrote it before the move, says it best. Else the
    # services pass a gate's comment as the move's reason: as it is when approved, after
    # "rejected by <name>: " when rejected.
    if actor is not None:
        for comment in Approval.objects.filter(step_id=step_id, user=actor).values_list("comment", flat=True)[:1]:
            return comment
    if action == "reject" and actor is not None:
        prefix = f"rejected by {actor.get_username()}"
        return reason.removeprefix(prefix).removeprefix(": ") if reason.startswith(prefix) else reason
    return reason if action == "approve" else ""


def _environment(environment: Environment) -> dict:
    return {"name": environment.name, "url": link(reverse("environment", args=[environment.name]))}


def _payload(event: str, release: Release, *, actor, gate: dict | None, failed_step: dict | None = None) -> dict:
    payload = {
        "event": event,
        "environment": _environment(release.environment),
        "release": {
            "id": release.pk,
            "url": link(reverse("release", args=[release.pk])),
            "revision": release.revision,
            "strategy": release.strategy,
            "status": release.status,
            "started_by": release.requested_by.get_username(),
            "error": _clean(release.error),
            "failed_step": failed_step,
        },
        "gate": gate,
        "actor": actor.get_username() if actor is not None and actor.is_authenticated else None,
    }
    payload["text"] = headline(payload)
    return payload


def _gate(step: Step, release: Release, *, decision: str | None = None, comment: str = "") -> dict:
    environment = release.environment
    approvals = [{"by": a.user.get_username() if a.user else "", "decision": a.get_decision_display().lower(),
                  "comment": _clean(a.comment), "at": _iso(a.at)}
                 for a in step.approvals.select_related("user").order_by("at", "pk")]
    four_eyes = bool(release.plan.get("environment", {}).get("four_eyes"))
    return {
        "key": step.key,
        "status": step.status,
        "opened_at": _iso(step.started_at),
        "deadline": _iso(step.deadline),
        "may_decide": {
            "groups": [g.name for g in permissions.gate_groups(environment, step.key)],  # none: every approver
            "approvals_required": permissions.approvals_required(release),  # as frozen with the release
            "not": release.requested_by.get_username() if four_eyes else None,  # four eyes: never who started it
        },
        "assignee": step.assignee.get_username() if step.assignee_id else None,
        "decision": decision,
        "comment": _clean(comment),
        "approvals": approvals,
    }


def _who_decides(gate: dict) -> str:
    rule = gate["may_decide"]
    who = f"any of: {', '.join(rule['groups'])}" if rule["groups"] else "any approver"
    if rule["approvals_required"] > 1:
        who += f", {rule['approvals_required']} approvals"
    if rule["not"]:
        who += f", not {rule['not']}"
    return who


def _until(deadline: str | None) -> str:
    if not deadline:
        return ""
    return datetime.fromisoformat(deadline.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M:%S UTC")


def headline(payload: dict) -> str:
    """One line that says it all: the Slack fallback, the email's subject, the webhook's "text"."""
    event, release, gate = payload["event"], payload["release"], payload["gate"]
    if release is None:
        return payload.get("text", event)
    where = f"{payload['environment']['name']}: release #{release['id']} {release['revision']}"
    by = f" by {payload['actor']}" if payload["actor"] else ""
    if event == "gate.opened":
        return f"{where} waits for {gate['key']} (decide by {_until(gate['deadline'])}; {_who_decides(gate)})"
    if event == "gate.expiring":
        return f"{where}: {gate['key']} closes itself at {_until(gate['deadline'])} unless someone decides"
    if event == "gate.decided":
        if gate["decision"] == "expired":
            return f"{where}: {gate['key']} expired: nobody decided before its deadline"
        said = f": “{gate['comment']}”" if gate["comment"] else ""
        return f"{where}: {gate['key']} {gate['decision']}{by}{said}"
    if event == "gate.assigned":
        return f"{where}: {gate['assignee'] or payload['actor']} took {gate['key']}"
    if event == "release.succeeded":
        return f"{where} succeeded: {payload['environment']['name']} serves {release['revision']}"
    if event == "release.failed":
        failed = release["failed_step"]
        if failed:
            return f"{where} failed at {failed['key']}: {failed['error'] or release['error']}"
        return f"{where} failed: {release['error']}"
    if event == "release.cancelled":
        return f"{where} was cancelled; what it made is cleaned up"
    if event == "release.rolled_back":
        return f"{where} was rolled back: the old fleet serves" + (f" ({release['error']})" if release["error"] else "")
    return f"{where}: {event}"


# -- formats ------------------------------------------------------------------------------------


def webhook_body(delivery: Delivery) -> bytes:
    payload = delivery.notification.payload
    body = {"id": str(delivery.uuid), "event": payload["event"], "at": payload["at"],
            "environment": payload["environment"], "release": payload["release"], "gate": payload["gate"],
            "actor": payload["actor"], "text": payload["text"]}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _mrkdwn(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_body(payload: dict) -> bytes:
    """An incoming webhook's message: the text as a fallback, a section, and a button to the page."""
    text = payload["text"]
    release = payload["release"]
    url = release["url"] if release else payload["environment"]["url"]
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": _mrkdwn(text)}}]
    details = _details(payload)
    if details:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": _mrkdwn(" · ".join(details))}]})
    label = f"Open release #{release['id']}" if release else f"Open {payload['environment']['name']}"
    blocks.append({"type": "actions", "elements": [{"type": "button", "text": {"type": "plain_text", "text": label}, "url": url}]})
    return json.dumps({"text": text, "blocks": blocks}, ensure_ascii=False).encode()


def _details(payload: dict) -> list[str]:
    release, gate = payload["release"], payload["gate"]
    if release is None:
        return []
    lines = [f"started by {release['started_by']}", f"strategy {release['strategy']}"]
    if gate and gate["status"] == Step.Status.AWAITING_APPROVAL:
        lines.append(f"may decide: {_who_decides(gate)}")
        if gate["assignee"]:
            lines.append(f"taken by {gate['assignee']}")
    return lines


def email_message(payload: dict) -> tuple[str, str, str]:
    """(subject, plain text, HTML) of an email."""
    text = payload["text"]
    release = payload["release"]
    url = release["url"] if release else payload["environment"]["url"]
    lines = [text, "", url, "", *_details(payload)]
    if release and release["failed_step"] and release["failed_step"]["error"]:
        lines += ["", f"{release['failed_step']['key']} failed:", release["failed_step"]["error"]]
    lines += ["", f"-- Greenlight ({payload['event']})"]
    body = "\n".join(lines).rstrip() + "\n"
    html = (f"<p>{escape(text)}</p><p><a href=\"{escape(url)}\">{escape(url)}</a></p>"
            + "".join(f"<p>{escape(line)}</p>" for line in _details(payload))
            + f"<p>-- Greenlight ({escape(payload['event'])})</p>")
    return f"[greenlight] {text}", body, html


# -- delivering -------------------------------------------------------------------------------


def max_attempts(delivery: Delivery) -> int:
    # a test is for the person who pressed the button: once, and they press it again
    return 1 if delivery.notification.event == TEST else settings.NOTIFY_ATTEMPTS


def backoff(attempts: int) -> float:
    """Seconds before attempt `attempts` + 1: NOTIFY_RETRY_SECONDS, doubling, at most NOTIFY_RETRY_MAX_SECONDS."""
    return min(settings.NOTIFY_RETRY_SECONDS * 2 ** max(attempts - 1, 0), settings.NOTIFY_RETRY_MAX_SECONDS)


def deliver(delivery_id: int) -> float | None:
    """Send one delivery if it is due and nobody else is sending it. Returns
    the seconds until it should be tried again, or None (sent, given up, or not ours)."""
    now = timezone.now()
    due = now + CLOCK_SKEW
    claimed = Delivery.objects.filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=due), pk=delivery_id,
                                      status=Delivery.Status.PENDING).update(status=Delivery.Status.SENDING,
                                                                             lease_expires_at=now + LEASE)
    if not claimed:
        return None  # sent, given up, at work elsewhere, or not due yet (its own message, or the sweep, comes then)
    delivery = Delivery.objects.select_related("notification", "channel").get(pk=delivery_id)
    if delivery.channel is None:
        return _failed(delivery, "the channel was deleted", final=True)
    if not delivery.channel.enabled and delivery.notification.event != TEST:
        return _failed(delivery, "the channel was disabled", final=True)
    try:
        send(delivery)
    except AdapterError as exc:
        return _failed(delivery, str(exc))
    except Exception as exc:  # a bug here must not leave the row 'sending' until its lease runs out
        log.exception("delivery %s to %s crashed", delivery.pk, delivery.channel_name)
        return _failed(delivery, f"internal error: {type(exc).__name__}")
    Delivery.objects.filter(pk=delivery.pk, status=Delivery.Status.SENDING).update(
        status=Delivery.Status.SENT, sent_at=timezone.now(), attempts=F("attempts") + 1, last_error="",
        lease_expires_at=None, next_attempt_at=None)
    return None


def send(delivery: Delivery) -> None:
    """Send `delivery` in its channel's format (AdapterError when it did not go)."""
    channel, payload = delivery.channel, delivery.notification.payload
    if channel.kind == NotificationChannel.Kind.EMAIL:
        subject, text, html = email_message(payload)
        recipients = [r.strip() for r in channel.recipients.split(",") if r.strip()]
        if not recipients:
            raise AdapterError("the channel names no recipient")
        notify.send_email(subject=subject, text=text, html=html, recipients=recipients, sender=settings.NOTIFY_FROM)
    elif channel.kind == NotificationChannel.Kind.SLACK:
        notify.send_slack(channel.url, slack_body(payload))
    elif channel.kind == NotificationChannel.Kind.WEBHOOK:
        notify.send_webhook(channel.url, webhook_body(delivery), event=payload["event"], delivery=str(delivery.uuid),
                            secret=channel.secret)
    else:
        raise AdapterError(f"unknown channel kind {channel.kind!r}")


def _failed(delivery: Delivery, error: str, *, final: bool = False) -> float | None:
    channel = delivery.channel
    for secret in (channel.url, channel.secret) if channel is not None else ():
        if secret:
            error = error.replace(secret, "[redacted]")
    attempts = delivery.attempts + 1
    final = final or attempts >= max_attempts(delivery)
    delay = backoff(attempts)
    updated = Delivery.objects.filter(pk=delivery.pk, status=Delivery.Status.SENDING).update(
        status=Delivery.Status.FAILED if final else Delivery.Status.PENDING, attempts=F("attempts") + 1,
        last_error=error[:ERROR_LIMIT], lease_expires_at=None,
        next_attempt_at=None if final else timezone.now() + timedelta(seconds=delay))
    log.warning("delivery %s (%s to %s), attempt %s: %s%s", delivery.pk, delivery.notification.event, delivery.channel_name,
                attempts, error[:ERROR_LIMIT], "; giving up" if final else f"; trying again in {delay:g}s")
    return None if final or not updated else delay


# -- the sweep ----------------------------------------------------------------------------------


def remind(now: datetime) -> int:
    """gate.expiring for each open gate within its environment's gate_reminder of its deadline, once."""
    reminded = 0
    gates = Step.objects.filter(status=Step.Status.AWAITING_APPROVAL, reminded_at__isnull=True, deadline__gt=now,
                                release__environment__gate_reminder__gt=0).select_related(
        "release__environment", "release__requested_by", "assignee")
    for step in gates:
        if step.deadline - timedelta(seconds=step.release.environment.gate_reminder) > now:
            continue
        with transaction.atomic():
            if not Step.objects.filter(pk=step.pk, status=Step.Status.AWAITING_APPROVAL, reminded_at__isnull=True).update(
                    reminded_at=now):
                continue  # decided meanwhile, or another sweep got there first
            _guarded(lambda: gate_event(step, "gate.expiring"))
        reminded += 1
    return reminded


def sweep(now: datetime) -> tuple[list[int], dict]:
    """Reminders; deliveries whose worker died mid-send taken back; the
    deliveries to queue now (taken back, or due and their message lost)."""
    reminded = remind(now)
    lost = list(Delivery.objects.filter(status=Delivery.Status.SENDING, lease_expires_at__lt=now)
                .values_list("pk", flat=True)[:SWEEP_BATCH])
    taken = 0
    if lost:
        taken = Delivery.objects.filter(pk__in=lost, status=Delivery.Status.SENDING, lease_expires_at__lt=now).update(
            status=Delivery.Status.PENDING, lease_expires_at=None, next_attempt_at=now)
    due = set(Delivery.objects.filter(status=Delivery.Status.PENDING, next_attempt_at__lte=now - NUDGE_GRACE)
              .values_list("pk", flat=True)[:SWEEP_BATCH])
    if taken:
        due.update(lost)
    return sorted(due), {"reminded": reminded, "taken_back": taken}
