"""API tokens: each person creates, rotates and revokes their own.

A token is shown in full once, in the answer to the request that made it;
afterwards only its prefix, enough to tell two apart. DRF stores the key as it
is (its TokenAuthentication looks it up by key), so the database and its
backups must be guarded like the secret key.
"""

from __future__ import annotations

from django.db import transaction
from rest_framework.authtoken.models import Token

from . import audit

PREFIX = 6


def token_prefix(key: str) -> str:
    return f"{key[:PREFIX]}…"


def token_of(user) -> Token | None:
    return Token.objects.filter(user=user).first()


@transaction.atomic
def token_rotate(*, user, source_ip: str | None = None) -> str:
    """A new token for `user`, replacing any old one (which stops working at once). Returns the key."""
    old = Token.objects.select_for_update().filter(user=user).first()
    replaced = {}
    if old is not None:
        replaced = {"replaced": token_prefix(old.key)}
        old.delete()
    token = Token.objects.create(user=user)
    audit.record("token.rotate" if old is not None else "token.create", actor=user, source_ip=source_ip,
                 target=user.get_username(), prefix=token_prefix(token.key), **replaced)
    return token.key


@transaction.atomic
def token_revoke(*, user, actor=None, source_ip: str | None = None) -> bool:
    """Delete `user`'s token; False when there was none."""
    old = Token.objects.select_for_update().filter(user=user).first()
    if old is None:
        return False
    prefix = token_prefix(old.key)
    old.delete()
    audit.record("token.revoke", actor=actor or user, source_ip=source_ip, target=user.get_username(), prefix=prefix)
    return True
