"""API tokens: each person creates, rotates and revokes their own.

A key is 40 random hex characters (160 bits, the format DRF used, so keys made
before keep working). The database holds only its SHA-256 digest and its first
characters: the key is shown in full once, in the answer to the request that
made it, and a copy of the database or a backup gives no working key.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from . import audit
from .models import ApiToken

PREFIX = 6
# last_used is written at most this often per token: an API call is not a database write
LAST_USED_EVERY = timedelta(minutes=1)


def token_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def token_prefix(token: ApiToken) -> str:
    return f"{token.prefix}…"


def token_of(user) -> ApiToken | None:
    return ApiToken.objects.filter(user=user).first()


def token_authenticate(key: str) -> ApiToken | None:
    """The token whose key is `key`, with its user, or None; notes when it was used."""
    token = ApiToken.objects.select_related("user").filter(digest=token_digest(key)).first()
    if token is not None:
        now = timezone.now()
        ApiToken.objects.filter(Q(last_used__isnull=True) | Q(last_used__lt=now - LAST_USED_EVERY),
                                pk=token.pk).update(last_used=now)
    return token


@transaction.atomic
def token_rotate(*, user, actor, source_ip: str | None = None) -> str:
    """A new token for `user`, replacing any old one (which stops working at once). Returns the key.

    `actor` is who asked: the person themselves, or None for `manage.py create_token` on the server."""
    old = ApiToken.objects.select_for_update().filter(user=user).first()
    replaced = {}
    if old is not None:
        replaced = {"replaced": token_prefix(old)}
        old.delete()
    key = secrets.token_hex(20)
    token = ApiToken.objects.create(user=user, prefix=key[:PREFIX], digest=token_digest(key))
    audit.record("token.rotate" if old is not None else "token.create", actor=actor, source_ip=source_ip,
                 target=user.get_username(), prefix=token_prefix(token), **replaced)
    return key


@transaction.atomic
def token_revoke(*, user, actor, source_ip: str | None = None) -> bool:
    """Delete `user`'s token; False when there was none."""
    old = ApiToken.objects.select_for_update().filter(user=user).first()
    if old is None:
        return False
    prefix = token_prefix(old)
    old.delete()
    audit.record("token.revoke", actor=actor, source_ip=source_ip, target=user.get_username(), prefix=prefix)
    return True


def token_password_refused(*, user, source_ip: str | None = None, failures: int | None = None) -> None:
    """A signed-in person gave a wrong password to make a token (django-axes counts it too)."""
    audit.record("token.password_refused", actor=user, source_ip=source_ip, target=user.get_username(), failures=failures)
