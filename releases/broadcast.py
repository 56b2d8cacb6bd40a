"""Messages to the Channels group `release-<id>`, for every browser watching."""

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


def group(release_id: int) -> str:
    return f"release-{release_id}"


def send(release_id: int, message: dict) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        sending = layer.group_send(group(release_id), {"type": "release.event", "event": message})
        asyncio.run_coroutine_threadsafe(sending, _event_loop()).result(SEND_TIMEOUT)
    except Exception as exc:  # the database has it; a browser back-fills what it missed
        log.warning("could not broadcast to release %s: %s", release_id, exc)


def release_changed(release_id: int) -> None:
    from .models import Release

    status = Release.objects.values_list("status", flat=True).get(pk=release_id)
    send(release_id, {"type": "release", "id": release_id, "status": status})


def step_changed(release_id: int, step_id: int) -> None:
    from .models import Step

    step = Step.objects.get(pk=step_id)
    send(release_id, {"type": "gate" if step.kind == "gate" else "step", "key": step.key, "status": step.status, "attempts": step.attempts, "error": step.error})


def log_lines(release_id: int, lines: list[dict]) -> None:
    send(release_id, {"type": "log", "lines": lines})
