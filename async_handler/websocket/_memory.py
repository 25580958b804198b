"""The server's side of a WebSocket, in memory, for :mod:`async_handler.websocket.testing`.

Layer: stdlib, ``websockets`` (for its close-frame checks) and the contract.  The peer is the
test client: anything with ``_deliver(message)`` and ``_close_frame(code, reason)``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from websockets.exceptions import ProtocolError
from websockets.frames import Close

from ..contract import WebSocketDisconnect

__all__ = ["MemorySession", "check_close", "message"]


class Peer(Protocol):
    """The client end: receives what the application sends."""

    def _deliver(self, message: str | bytes) -> None: ...

    def _close_frame(self, code: int, reason: str) -> None: ...


def check_close(code: int, reason: str) -> None:
    """Raise ``websockets.exceptions.ProtocolError`` for a close frame no peer may send."""
    # websockets' own checks on a close frame we send (RFC 6455 sections 5.5 and 7.4):
    # a code the RFC allows on the wire, and a control frame payload of at most 125 bytes.
    payload = Close(code, reason).serialize()
    if len(payload) > 125:
        raise ProtocolError("control frame too long")


def message(data: object) -> str | bytes:
    """``data`` as a message: ``str`` (text) or ``bytes`` (binary); ``TypeError`` otherwise."""
    if isinstance(data, str):
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"a WebSocket message is str or bytes, not {type(data).__name__}")


class MemorySession:
    """The server's side of the socket, in memory (an ``async_handler.contract.WebSocketSession``).

    It follows :class:`async_handler.http.websocket.WebSocket`: messages queued before a close
    are still received; the closing handshake completes as soon as both close frames are out,
    the client echoing the server's at once as a ``websockets`` client does.
    """

    def __init__(self, peer: Peer, subprotocols: Sequence[str]) -> None:
        self.subprotocols: Sequence[str] = tuple(subprotocols)
        self._peer = peer
        loop = asyncio.get_running_loop()
        self._open = False
        self._lost = False
        self._opened: asyncio.Future[None] = loop.create_future()
        self._closed: asyncio.Future[None] = loop.create_future()
        self._messages: deque[str | bytes] = deque()
        self._wakeup = asyncio.Event()
        self.close_rcvd: tuple[int, str] | None = None
        self.close_sent: tuple[int, str] | None = None

    @property
    def close_code(self) -> int | None:
        """The client's close code once closed (``1006`` if the client vanished), else None."""
        if self.close_rcvd is not None:
            return self.close_rcvd[0]
        return 1006 if self._lost else None

    def _disconnect(self) -> WebSocketDisconnect:
        close = self.close_rcvd or self.close_sent
        if close is not None and not (self._lost and self.close_rcvd is None):
            return WebSocketDisconnect(*close)
        return WebSocketDisconnect(1006, "connection lost")

    async def opened(self) -> None:
        """Return once the 101 is out; 1006 if the handshake was answered otherwise."""
        if not self._open and not self._lost:
            await asyncio.shield(self._opened)
        if not self._open:
            raise WebSocketDisconnect(1006, "connection lost before the handshake completed")

    async def receive(self) -> str | bytes:
        """The client's next message; :class:`WebSocketDisconnect` once none can follow."""
        while True:
            if self._messages:
                return self._messages.popleft()
            if self._lost or self.close_rcvd is not None or self.close_sent is not None:
                raise self._disconnect()
            self._wakeup.clear()
            await self._wakeup.wait()

    async def send(self, data: str | bytes) -> None:
        """Deliver a message to the client; :class:`WebSocketDisconnect` unless open."""
        if not self._open or self._lost or self.close_rcvd or self.close_sent:
            raise self._disconnect()
        self._peer._deliver(message(data))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame (once) and return when the closing handshake is over."""
        if self._open and not self._lost and self.close_sent is None and self.close_rcvd is None:
            check_close(code, reason)
            self.close_sent = (code, reason)
            self._peer._close_frame(code, reason)
        elif not self._open and not self._lost:
            return  # never opened: the "connection" ends after the HTTP answer
        await asyncio.shield(self._closed)

    # -- the client's and the driver's side

    def start(self) -> None:
        """The 101 is out: the session is open."""
        self._open = True
        if not self._opened.done():
            self._opened.set_result(None)

    def frame(self, message: str | bytes) -> None:
        """A message from the client."""
        self._messages.append(message)
        self._wakeup.set()

    def close_frame(self, code: int, reason: str) -> None:
        """The client's close frame (or its echo of ours)."""
        self.close_rcvd = (code, reason)
        if self.close_sent is None:
            # websockets' ServerProtocol answers a close frame with the same code at once.
            self.close_sent = (code, reason)
            self._peer._close_frame(code, reason)
        self._ended()

    def connection_lost(self) -> None:
        """The client is gone without a closing handshake (or never got a 101)."""
        self._lost = True
        if not self._opened.done():
            self._opened.set_result(None)
        self._ended()

    def _ended(self) -> None:
        if not self._closed.done():
            self._closed.set_result(None)
        self._wakeup.set()

    async def wait_closed(self) -> None:
        """Return once the session is over (closed or lost)."""
        await asyncio.shield(self._closed)
