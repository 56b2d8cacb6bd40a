"""Telling people: events become Notification rows, written in the same
transaction as the change they report (an outbox), and one Delivery per
channel, sent by a Celery task with retries. (Being built: issue 11.)"""

from __future__ import annotations


def gate_event(step, event: str, *, actor=None, **extra) -> None:
    """Record `event` ("gate.opened", "gate.expiring", "gate.decided", "gate.assigned") about gate `step`."""
