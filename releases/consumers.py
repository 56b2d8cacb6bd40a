"""The live release feed: `/ws/releases/<id>/`.

A browser may send {"after": seq}; it gets every stored line after seq, then
live events. It joins the group before replaying, so nothing falls between
the two; it drops the duplicates that overlap by their seq.
"""

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from . import broadcast, permissions, selectors
from .models import Release


class ReleaseConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        self.release_id = int(self.scope["url_route"]["kwargs"]["release_id"])
        user = self.scope.get("user")
        if user is None or not await database_sync_to_async(permissions.can_view)(user):
            await self.close(code=4403)
            return
        if not await database_sync_to_async(Release.objects.filter(pk=self.release_id).exists)():
            await self.close(code=4404)
            return
        await self.channel_layer.group_add(broadcast.group(self.release_id), self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        if hasattr(self, "release_id"):
            await self.channel_layer.group_discard(broadcast.group(self.release_id), self.channel_name)

    async def receive_json(self, content, **kwargs):
        after = content.get("after") if isinstance(content, dict) else None
        if not isinstance(after, int) or after < 0:
            await self.send_json({"type": "error", "error": 'send {"after": <seq>} to replay the log'})
            return
        while True:
            page = await database_sync_to_async(selectors.log_lines)(self.release_id, after=after)
            if not page["lines"]:
                break
            await self.send_json({"type": "log", "lines": page["lines"]})
            after = page["next"]
        await self.send_json({"type": "replayed", "seq": after})

    async def release_event(self, message):
        await self.send_json(message["event"])
