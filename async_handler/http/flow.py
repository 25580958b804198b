"""Back-pressure for one connection, in both directions."""

from __future__ import annotations

import asyncio

__all__ = ["FlowControl"]


class FlowControl:
    """Tracks whether a transport may be read from and written to.

    Writing: the transport calls the protocol's ``pause_writing``/``resume_writing`` around its
    high-water mark; senders ``await drain()`` after each write so that a slow client holds at
    most one transport buffer of response, never the whole body.  Reading is paused by the
    protocol for its own reasons (a pipelined request waiting, a refused connection being
    drained); :meth:`resume_reading` is a no-op once the connection is lost.
    """

    __slots__ = ("_lost", "_transport", "_writable", "read_paused", "write_paused")

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self.read_paused = False
        self.write_paused = False
        self._lost = False
        # Made by the first drain() that has to wait: an Event and its waiter deque are about
        # 900 bytes, on every connection, and most never fill their transport buffer.
        self._writable: asyncio.Event | None = None

    def pause_reading(self) -> None:
        """Stop reading from the socket (idempotent)."""
        if not self.read_paused and not self._lost:
            self.read_paused = True
            self._transport.pause_reading()  # type: ignore[attr-defined]

    def resume_reading(self) -> None:
        """Read from the socket again (idempotent)."""
        if self.read_paused and not self._lost:
            self.read_paused = False
            self._transport.resume_reading()  # type: ignore[attr-defined]

    def pause_writing(self) -> None:
        """The transport's buffer is above its high-water mark."""
        self.write_paused = True

    def resume_writing(self) -> None:
        """The transport's buffer drained below its low-water mark."""
        self.write_paused = False
        self._release()

    def connection_lost(self) -> None:
        """Release every :meth:`drain` waiter: nothing more will be written."""
        self._lost = True
        self.write_paused = False
        self._release()

    @property
    def lost(self) -> bool:
        """Whether the connection is gone."""
        return self._lost

    async def drain(self) -> None:
        """Return once the transport accepts more data (or the connection is gone)."""
        if self.write_paused:
            writable = self._writable
            if writable is None:
                writable = self._writable = asyncio.Event()
            await writable.wait()

    def _release(self) -> None:
        # Wake every drain() waiting; the next pause gets a fresh Event.
        writable, self._writable = self._writable, None
        if writable is not None:
            writable.set()
