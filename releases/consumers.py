"""The live feeds: a release's at `/ws/releases/<id>/`, the dashboard's at `/ws/dashboard/`.

A browser may send {"after": seq}; it gets every stored line after seq, then
live events. It joins the group before replaying, so nothing falls between
the two; it drops the duplicates that overlap by their seq. Anything else it
sends (not JSON, binary, not an object, a bad `after`) is answered with
{"type": "error", ...} and the connection stays open.

When the channel layer (Redis) stops answering, the socket is closed with
4503 (unavailable) and one warning, not a traceback: the page reconnects by
itself, and its {"after": seq} fills in what it missed.

The dashboard's feed carries every release's status events (no log lines);
the page refreshes its fragment over HTTP on each, so it never polls.

On both, when a gate opens, a person who may decide it (broadcast.gate_notice)
also gets {"type": "notify", ...}: the page shows it in the page and, if they
allowed it, as a system notification.
"""

import asyncio
import json
import logging

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from redis.exceptions import RedisError

from . import broadcast, params, permissions, selectors
from .models import Release

log = logging.getLogger(__name__)
USAGE = 'send {"after": <seq>} to replay the log'
UNAVAILABLE = 4503  # like 4403 and 4404: an HTTP status in 4000-4999, the close codes left to applications
# channels-redis drops a group's member a day after it joined (group_expiry), silently: a dashboard
# left open on a wall would stop hearing anything. A feed joins again, well within that.
REJOIN_SECONDS = 3600


class Feed(AsyncJsonWebsocketConsumer):
    """What both feeds share: a closed, not crashed, socket when Redis is away;
    events passed on; a notice to whoever may decide a gate that opened."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except (RedisError, OSError) as exc:  # OSError: a refused or reset connection, or a timeout
            log.warning("closing a release feed: the channel layer is not answering (%s); the page will reconnect",
                        type(exc).__name__)
            try:
                await send({"type": "websocket.close", "code": UNAVAILABLE})
            except Exception:  # the browser went first
                pass
        finally:
            if getattr(self, "rejoining", None) is not None:
                self.rejoining.cancel()

    async def join(self, group: str) -> None:
        self.joined = group
        await self.channel_layer.group_add(group, self.channel_name)
        self.rejoining = asyncio.ensure_future(self._rejoin())

    async def _rejoin(self) -> None:
        while True:
            await asyncio.sleep(REJOIN_SECONDS)
            try:
                await self.channel_layer.group_add(self.joined, self.channel_name)
            except (RedisError, OSError) as exc:  # the next try, or the page's reconnect, mends it
                log.warning("a feed could not renew its place in %s (%s)", self.joined, type(exc).__name__)

    async def leave(self) -> None:
        if getattr(self, "rejoining", None) is not None:
            self.rejoining.cancel()
        if getattr(self, "joined", None):
            await self.channel_layer.group_discard(self.joined, self.channel_name)

    async def release_event(self, message):
        event = message["event"]
        await self.send_json(event)
        if event.get("type") == "gate" and event.get("status") == "awaiting_approval" and message.get("step"):
            notice = await database_sync_to_async(broadcast.gate_notice)(self.scope.get("user"), message["step"])
            if notice is not None:
                await self.send_json(notice)


class ReleaseConsumer(Feed):
    async def connect(self):
        self.release_id = int(self.scope["url_route"]["kwargs"]["release_id"])
        user = self.scope.get("user")
        if user is None or not await database_sync_to_async(permissions.can_view)(user):
            await self.close(code=4403)
            return
        if not await database_sync_to_async(Release.objects.filter(pk=self.release_id).exists)():
            await self.close(code=4404)
            return
        await self.join(broadcast.group(self.release_id))
        await self.accept()

    async def disconnect(self, code):
        await self.leave()

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        if text_data is None:
            await self._error("binary frames are not read: send text, " + USAGE)
            return
        try:
            content = json.loads(text_data)
        except (ValueError, RecursionError):  # RecursionError: "[[[[..." deeper than the parser goes
            await self._error("that is not JSON: " + USAGE)
            return
        await self.receive_json(content)

    async def _error(self, message: str, **details):
        await self.send_json({"type": "error", "error": message, **details})

    async def receive_json(self, content, **kwargs):
        if not isinstance(content, dict) or "after" not in content:
            await self._error(USAGE)
            return
        after = content["after"]
        try:
            if isinstance(after, str):  # a JSON number, as the API's `next` gives it
                raise params.BadInput("after is a JSON number", field="after")
            after = params.whole_number(after, "after")
        except params.BadInput as exc:
            await self._error(f"{exc}; {USAGE}", **exc.details)
            return
        if after is None:
            await self._error(USAGE)
            return
        while True:
            page = await database_sync_to_async(selectors.log_lines)(self.release_id, after=after)
            if not page["lines"]:
                break
            await self.send_json({"type": "log", "lines": page["lines"]})
            after = page["next"]
        await self.send_json({"type": "replayed", "seq": after})


class DashboardConsumer(Feed):
    """Every release's status events, for the dashboard; it sends nothing, and
    what it is sent is ignored."""

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not await database_sync_to_async(permissions.can_view)(user):
            await self.close(code=4403)
            return
        await self.join(broadcast.DASHBOARD)
        await self.accept()

    async def disconnect(self, code):
        await self.leave()

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        pass
