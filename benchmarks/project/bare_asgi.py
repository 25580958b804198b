"""A trivial ASGI application without Django: the same response as ``bare_contract.py``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

BODY = b"Hello, world!"
HEADERS = [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())]


async def application(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    if scope["type"] != "http":
        # Lifespan and WebSocket are not part of the benchmark; servers run with lifespan off.
        raise ValueError(f"bare_asgi serves only HTTP, got scope type {scope['type']!r}")
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
