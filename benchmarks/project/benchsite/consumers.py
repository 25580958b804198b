"""The WebSocket endpoints of ``benchsite/ws_views.py`` as Channels ``AsyncWebsocketConsumer``s,
written as the Channels tutorial writes them (``group_add`` in ``connect``, ``group_send`` with a
handler ``type``).  Served by ``asgi_channels.py``; the group fan-out goes through the channel
layer of ``settings_channels.py`` (``InMemoryChannelLayer``).
"""

from __future__ import annotations

from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer

from .ws_views import GROUP, JOINED


class Echo(AsyncWebsocketConsumer):
    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        await self.send(text_data=text_data, bytes_data=bytes_data)


class Fanout(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        await self.channel_layer.group_add(GROUP, self.channel_name)
        await self.accept()
        await self.send(text_data=JOINED)

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(GROUP, self.channel_name)

    async def fanout_message(self, event: dict[str, Any]) -> None:
        await self.send(text_data=event["text"])


class FanoutSend(AsyncWebsocketConsumer):
    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        await self.channel_layer.group_send(GROUP, {"type": "fanout.message", "text": text_data})
