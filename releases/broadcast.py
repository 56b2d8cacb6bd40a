"""Messages to the Channels group `release-<id>`, for every browser watching."""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)


def group(release_id: int) -> str:
    return f"release-{release_id}"


def send(release_id: int, message: dict) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group(release_id), {"type": "release.event", "event": message})
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
