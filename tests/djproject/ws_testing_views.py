"""WebSocket views for tests/test_websocket_testing.py (the in-process WebSocketClient).

Included under ``wstest/``; each records what its socket lived through in ``EVENTS`` (the list
tests/djproject/views.py keeps for the cancellation tests), tagged by the URL.
"""

import asyncio
import json

from django.urls import path

from async_handler.websocket import WebSocketDisconnect, websocket

from .views import EVENTS


@websocket
async def json_echo(request, ws):
    """Answer each JSON message with ``{"got": message, "user": ..., "query": ...}``."""
    user = await request.auser()
    await ws.accept()
    async for message in ws:
        await ws.send_json(
            {
                "got": json.loads(message),
                "user": user.get_username() or None,
                "query": request.GET.get("q"),
            }
        )


@websocket(subprotocols=["chat.v2", "chat.v1"])
async def negotiate(request, ws):
    """Accept with the first offered subprotocol we support (``?pick=`` forces one)."""
    pick = request.GET.get("pick")
    await ws.accept(subprotocol=pick)
    await ws.send(ws.subprotocol or "none")
    await ws.receive()


@websocket
async def close_with(request, ws, code):
    """Close at once with ``code`` and reason ``"bye"``."""
    await ws.accept()
    await ws.close(code, "bye")


@websocket
async def record_close(request, ws, tag):
    """Record the close code and reason the client closes with."""
    await ws.accept()
    try:
        while True:
            await ws.send(await ws.receive())
    except WebSocketDisconnect as closed:
        EVENTS.append(f"closed {tag} {closed.code} {closed.reason}")


@websocket
async def deaf(request, ws, tag):
    """Never read: push a tick every 50 ms until cancelled or the socket is gone."""
    await ws.accept()
    EVENTS.append(f"deaf started {tag}")
    try:
        while True:
            if request.GET.get("quiet"):
                await asyncio.sleep(3600)
            await ws.send("tick")
            await asyncio.sleep(0.05)
    except asyncio.CancelledError:
        EVENTS.append(f"deaf cancelled {tag}")
        raise
    except WebSocketDisconnect as closed:
        EVENTS.append(f"deaf disconnected {tag} {closed.code}")


@websocket
async def hesitate(request, ws, tag):
    """Never answer the handshake."""
    EVENTS.append(f"hesitate started {tag}")
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        EVENTS.append(f"hesitate cancelled {tag}")
        raise


urlpatterns = [
    path("json/", json_echo),
    path("negotiate/", negotiate),
    path("close/<int:code>/", close_with),
    path("record-close/<str:tag>/", record_close),
    path("deaf/<str:tag>/", deaf),
    path("hesitate/<str:tag>/", hesitate),
]
