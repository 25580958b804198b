"""WebSocket views of ``benchmarks/websocket.py``, as a user of ``async_handler.websocket`` writes
them.  ``benchsite/consumers.py`` holds the same three endpoints as Channels consumers.

* ``ws/echo/``: send every message back.
* ``ws/fanout/``: join the ``fanout`` group, say ``joined``, then receive its broadcasts.
* ``ws/fanout/send/``: broadcast every message received to ``fanout`` (not a member itself).
"""

from __future__ import annotations

from django.http import HttpRequest

from async_handler.websocket import WebSocket, broadcast, websocket

GROUP = "fanout"
JOINED = "joined"


@websocket
async def echo(request: HttpRequest, ws: WebSocket) -> None:
    await ws.accept()
    async for message in ws:
        await ws.send(message)


@websocket
async def fanout(request: HttpRequest, ws: WebSocket) -> None:
    await ws.accept()
    async with ws.join(GROUP):
        # Sent once the membership is in place: the client counts a socket as joined only then.
        await ws.send(JOINED)
        async for _ in ws:
            pass


@websocket
async def fanout_send(request: HttpRequest, ws: WebSocket) -> None:
    await ws.accept()
    async for message in ws:
        await broadcast(GROUP, message)
