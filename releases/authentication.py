"""The API's token authentication: `Authorization: Token <key>`, looked up by
the key's SHA-256 digest (releases/tokens.py), never by the key itself."""

from __future__ import annotations

from rest_framework import authentication, exceptions

from . import tokens


class TokenAuthentication(authentication.TokenAuthentication):
    """DRF's header parsing and 401 answers; our hashed tokens."""

    def authenticate_credentials(self, key):
        token = tokens.token_authenticate(key)
        if token is None:
            raise exceptions.AuthenticationFailed("Invalid token.")
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        return (token.user, token)
