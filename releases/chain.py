"""The audit chain's arithmetic: a keyed hash over each event and the one before it.

No models here: the migration that hashes the rows written before the chain
existed uses these same functions on its historical model.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import datetime, timezone

GENESIS = "0" * 64


def key() -> bytes:
    """`AUDIT_KEY` when set, else a key derived from SECRET_KEY for this one purpose
    (so a leaked audit key is not the session-signing key, and vice versa)."""
    from django.conf import settings

    if configured := getattr(settings, "AUDIT_KEY", ""):
        return configured.encode()
    return hmac.new(settings.SECRET_KEY.encode(), b"greenlight.audit-chain.v1", hashlib.sha256).digest()


def canonical_details(details: dict) -> dict:
    """What a JSON column gives back: the hash is over that, not over the Python value passed in."""
    return json.loads(json.dumps(details, sort_keys=True))


def canonical(*, seq: int, prev_hash: str, action: str, actor_name: str, source_ip: str | None, target: str,
              environment_id: int | None, release_id: int | None, details: dict, at: datetime) -> bytes:
    return json.dumps(
        {
            "seq": seq, "prev": prev_hash, "action": action, "actor": actor_name, "source_ip": source_ip or None,
            "target": target, "environment": environment_id, "release": release_id, "details": details,
            "at": at.astimezone(timezone.utc).isoformat(timespec="microseconds"),
        },
        sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    ).encode()


def mac(event, *, seq: int | None = None, prev_hash: str | None = None, secret: bytes | None = None) -> str:
    """The hash `event` (a row, or anything with its fields) should carry; `seq` and
    `prev_hash` default to the row's own."""
    content = canonical(
        seq=event.seq if seq is None else seq, prev_hash=event.prev_hash if prev_hash is None else prev_hash,
        action=event.action, actor_name=event.actor_name, source_ip=event.source_ip, target=event.target,
        environment_id=event.environment_id, release_id=event.release_id, details=event.details, at=event.at,
    )
    return hmac.new(secret or key(), content, hashlib.sha256).hexdigest()
