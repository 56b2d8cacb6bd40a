"""Messages to the Channels groups browsers listen on: `release-<id>` (a
release page: status events and log lines) and `releases` (every dashboard:
status events of every release, never log lines)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading

from channels.layers import get_channel_layer

log = logging.getLogger(__name__)

SEND_TIMEOUT = 10  # seconds: past this a message is given up on (the browser back-fills it)
_loop: tuple[int, asyncio.AbstractEventLoop] | None = None
_loop_lock = threading.Lock()


def _event_loop() -> asyncio.AbstractEventLoop:
    """The process's one event loop for sending, in a thread of its own.

    The channel layer keeps its Redis connections per event loop; async_to_sync
    gave every message a new loop, so every message connected afresh (about
    5 of a send's 7 ms, measured for `make bench`). A worker's pool process,
    forked from its parent, starts a loop of its own.
    """
    global _loop
    with _loop_lock:
        if _loop is None or _loop[0] != os.getpid():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="broadcast", daemon=True).start()
            _loop = (os.getpid(), loop)
        return _loop[1]


DASHBOARD = "releases"  # every dashboard: each release's status changes


def group(release_id: int) -> str:
    return f"release-{release_id}"


def send(release_id: int, message: dict, *, dashboard: dict | None = None, **extra) -> None:
    """`message` to the release's page; `dashboard`, when given, to every dashboard
    too (both sent at once: one wait, not two). `extra` rides along for the
    consumers (a gate's step id) and is not passed to the browser."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        sends = [layer.group_send(group(release_id), {"type": "release.event", "event": message, **extra})]
        if dashboard is not None:
            sends.append(layer.group_send(DASHBOARD, {"type": "release.event", "event": dashboard, **extra}))
        asyncio.run_coroutine_threadsafe(_all(sends), _event_loop()).result(SEND_TIMEOUT)
    except Exception as exc:  # the database has it; a browser back-fills what it missed
        log.warning("could not broadcast to release %s: %s", release_id, exc)


async def _all(sends) -> None:
    await asyncio.gather(*sends)


def release_changed(release_id: int) -> None:
    from .models import Release

    status = Release.objects.values_list("status", flat=True).get(pk=release_id)
    event = {"type": "release", "id": release_id, "status": status}
    send(release_id, event, dashboard=event)


def step_changed(release_id: int, step_id: int) -> None:
    from .models import Step

    step = Step.objects.get(pk=step_id)
    kind = "gate" if step.kind == "gate" else "step"
    send(release_id, {"type": kind, "key": step.key, "status": step.status, "attempts": step.attempts, "error": step.error},
         dashboard={"type": kind, "release": release_id, "key": step.key, "status": step.status}, step=step_id)


def log_lines(release_id: int, lines: list[dict]) -> None:
    send(release_id, {"type": "log", "lines": lines})


def gate_notice(user, step_id: int) -> dict | None:
    """What to tell `user` about gate `step_id` having opened, if it is still open and
    they may decide it (the environment's groups for this gate, and not their own
    release under four eyes): the browser shows it as a notification. None: nothing."""
    from django.urls import reverse

    from . import permissions
    from .models import Step

    step = (Step.objects.select_related("release__environment", "release__requested_by")
            .filter(pk=step_id, kind=Step.Kind.GATE, status=Step.Status.AWAITING_APPROVAL).first())
    if step is None or user is None or not user.is_authenticated:
        return None
    release = step.release
    if permissions.gate_refusal(user, release, step.key) is not None:
        return None
    if step.approvals.filter(user=user).exists():  # gave theirs already (a gate needing more than one)
        return None
    return {
        "type": "notify", "release": release.pk, "gate": step.key,
        "title": f"Release #{release.pk} waits for you: {step.key}",
        "body": f"{release.environment.name} {release.revision}, started by {release.requested_by.get_username()}",
        "url": reverse("release", args=[release.pk]),
        "tag": f"gate-{release.pk}-{step.key}-{step.attempts}",  # one notification, however many pages are open
    }
