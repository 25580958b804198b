"""The reference for the Autobahn runs: an ASGI WebSocket echo for ``uvicorn --ws websockets``.

It does what ``tests.djproject``'s ``ws_echo`` view does (accept, then send every message back,
text as text and binary as binary, until the client closes), so that ``scripts/autobahn
--server uvicorn`` measures uvicorn's WebSocket stack against the same expectations as ours.
Any HTTP request gets a 200 ``ok`` (the script polls ``/`` to know the server is up).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """ASGI 3 entry point: echo on ``websocket`` scopes, ``200 ok`` on ``http`` ones."""
    if scope["type"] == "http":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})
        return
    if scope["type"] != "websocket":
        return  # lifespan: nothing to set up
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        event = await receive()
        if event["type"] == "websocket.disconnect":
            return
        if event.get("text") is not None:
            await send({"type": "websocket.send", "text": event["text"]})
        else:
            await send({"type": "websocket.send", "bytes": event.get("bytes") or b""})
