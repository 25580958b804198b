"""A live chat room: a page, and the WebSocket its script opens.

Every message a signed-in user sends to ``/chat/<room>/ws/`` is broadcast to the room's group,
so every open tab of the room shows it, the sender's included.  Groups are in memory within one
gunicorn worker; with ``MONTAGE_REDIS_URL`` set, ``CHANNEL_LAYERS`` puts them on Redis and a
message reaches the tabs served by every worker (see ``montage/settings.py``).
"""

import json
import os
from datetime import UTC, datetime

from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import redirect, render

from async_handler.websocket import WebSocket, broadcast, websocket

#: Longest message accepted, in characters; a longer one closes the socket with 1009.
MAX_MESSAGE = 2000
#: The session key of the room a user last joined: the socket's handshake writes it, and
#: SessionMiddleware saves it on the 101 as it would on any response.
LAST_ROOM = "chat_last_room"


def _group(room: str) -> str:
    # Group names allow letters, digits, '-', '_' and '.' (Channels' rule); a slug fits.
    return f"chat.{room}"


def _event(kind: str, user: str, text: str = "") -> str:
    return json.dumps(
        {
            "type": kind,
            "user": user,
            "text": text,
            "time": datetime.now(UTC).isoformat(),
            # Which gunicorn worker serves the sender's socket: with --workers 2 and Redis,
            # the tabs of one room show different ones, and still see each other.
            "worker": os.getpid(),
        }
    )


async def lobby(request: HttpRequest) -> HttpResponseBase:
    """Pick a room by name (``?room=``), after signing in."""
    user = await request.auser()
    if not user.is_authenticated:
        return redirect_to_login(request.get_full_path(), "chat:login")
    room = request.GET.get("room", "").strip().lower()
    if room:
        return redirect("chat:room", room=room.replace(" ", "-"))
    last_room = await request.session.aget(LAST_ROOM)
    return render(request, "chat/lobby.html", {"user": user, "last_room": last_room})


async def room(request: HttpRequest, room: str) -> HttpResponseBase:
    """The room's page; its script connects to :func:`room_socket`."""
    user = await request.auser()
    if not user.is_authenticated:
        return redirect_to_login(request.get_full_path(), "chat:login")
    return render(request, "chat/room.html", {"room": room, "user": user})


@websocket
async def room_socket(request: HttpRequest, ws: WebSocket, room: str) -> HttpResponse | None:
    """Broadcast what the user sends (text frames) to everyone in ``room``.

    The handshake went through the middleware: an anonymous one is refused with 403, and a
    cross-site page cannot open it (``@websocket`` checks ``Origin``).
    """
    user = await request.auser()
    if not user.is_authenticated:
        return HttpResponse("Sign in to chat.", status=403, content_type="text/plain")
    name = user.get_username()
    group = _group(room)
    await request.session.aset(LAST_ROOM, room)
    await ws.accept()
    await ws.send(_event("welcome", name))
    async with ws.join(group):
        await broadcast(group, _event("join", name))
        try:
            async for message in ws:
                if not isinstance(message, str):
                    await ws.close(1003, "text messages only")  # RFC 6455 7.4.1
                    break
                if len(message) > MAX_MESSAGE:
                    await ws.close(1009, f"at most {MAX_MESSAGE} characters")
                    break
                text = message.strip()
                if text:
                    await broadcast(group, _event("message", name, text))
        finally:
            await broadcast(group, _event("leave", name))
    return None
