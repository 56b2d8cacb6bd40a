"""Websocket routes. The release group (`release-<id>`) arrives with the engine."""

websocket_urlpatterns: list = []
