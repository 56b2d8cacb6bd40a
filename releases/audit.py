"""The audit trail: who did what, to what, when, from where."""

from __future__ import annotations

from .models import AuditEvent

ENGINE = "greenlight"


def record(action: str, *, actor=None, source_ip: str | None = None, target: str = "", environment=None, release=None, **details) -> AuditEvent:
    return AuditEvent.objects.create(
        action=action,
        actor=actor if actor is not None and actor.is_authenticated else None,
        actor_name=actor.get_username() if actor is not None and actor.is_authenticated else ENGINE,
        source_ip=source_ip,
        target=target,
        environment=environment or (release.environment if release is not None else None),
        release=release,
        details=details,
    )
