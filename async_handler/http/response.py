"""The response writer: one :class:`RequestCycle` per request.

PEP 3333 ``start_response`` (status and header validation, the field cache) and ``write()``;
the head (status line, ``Server``/``Date``, ``Connection``, ``Content-Length`` or chunked
framing, ``HEAD``/204/304 without content) and :meth:`RequestCycle.emit`, which frames every
body byte.  Sans-IO apart from the connection it writes to (``cycle.proto``).
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..contract import WEBSOCKET_KEY
from .config import Environ, ExcInfo
from .fields import (
    HOP_BY_HOP,
    BodySpool,
    status_line,
    valid_header_name,
    valid_header_value,
    valid_status,
)

if TYPE_CHECKING:
    from .connection import HttpProtocol


class ClientDisconnected(ConnectionError):
    """Raised to the sender (and to a sync application's ``write()``) once the client is gone."""


class _BadResponse(Exception):
    """The application's status or headers cannot be written (RFC 9110 field syntax)."""


class _BrokenFraming(Exception):
    """The body already sent cannot be completed; the connection must be closed."""


# Validated response fields by (name, value): the same few recur on nearly every response, and
# checking them costs more than the rest of start_response.  Fields that start_response treats
# specially are never cached; the bound keeps per-response values (cookies, ETags) from growing
# it without limit.
_FIELD_CACHE_MAX = 512
_field_cache: dict[tuple[str, str], tuple[str, bytes]] = {}
_UNCACHED_FIELDS = HOP_BY_HOP | {"content-length", "date", "server"}


class _Refused:
    """A server-made answer queued behind the requests before it (responses stay in order)."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class RequestCycle:
    """One request and its response on an :class:`HttpProtocol`.

    Created when the request head is complete; the body is spooled into it; it runs the
    application once the body is complete and this request is first in line.  Its
    ``start_response`` and ``write`` are the PEP 3333 callables; the rest runs on the loop.
    """

    __slots__ = (
        "_app_length",
        "_lines",
        "app_close",
        "bad_response",
        "bytes_sent",
        "chunked",
        "closing",
        "complete",
        "content_length",
        "continue_pending",
        "declared_length",
        "environ",
        "finished",
        "has_date",
        "has_server",
        "head",
        "headers",
        "headers_sent",
        "http10",
        "keep_alive",
        "method",
        "no_body",
        "proto",
        "spool",
        "started",
        "status",
        "status_code",
        "task",
        "timed_out",
        "timeout",
        "timeout_handle",
    )

    def __init__(
        self,
        proto: HttpProtocol,
        environ: Environ,
        method: str,
        http10: bool,
        keep_alive: bool,
        spool: BodySpool | None,
    ) -> None:
        # request
        self.proto = proto
        self.environ = environ
        self.method = method
        self.head = method == "HEAD"
        self.http10 = http10
        self.keep_alive = keep_alive
        self.spool = spool
        self.complete = False
        self.closing = False
        self.continue_pending = False
        self.declared_length = 0
        self.task: asyncio.Task[None] | None = None
        self.started = 0.0
        self.timeout_handle: asyncio.TimerHandle | None = None
        self.timeout = 0.0
        self.timed_out = False
        # response, as given by the application
        self.status: str | None = None
        self.status_code = 0
        self.headers: list[tuple[str, str]] = []
        self._lines: list[tuple[str, bytes]] = []
        self._app_length: int | None = None
        self.app_close = False
        self.has_date = False
        self.has_server = False
        self.bad_response: str | None = None
        # response, as sent
        self.no_body = False
        self.headers_sent = False
        self.content_length: int | None = None
        self.chunked = False
        self.bytes_sent = 0
        self.finished = False

    # -- PEP 3333 callables: may run on the loop (contract apps) or on a pool thread.

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: ExcInfo | None = None,
    ) -> Callable[[bytes], None]:
        """PEP 3333 ``start_response``: validate and record the status and headers.

        Raises (to the application) for an invalid status or header; such a response is never
        written: the server answers 500 and closes the connection instead.  With ``exc_info``
        after the headers were sent, re-raises it, as PEP 3333 requires.
        """
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() called again without exc_info (PEP 3333)")
        handle = self.timeout_handle
        if handle is not None:
            self.timeout_handle = None
            handle.cancel()
        lines: list[tuple[str, bytes]] = []
        length: int | None = None
        app_close = has_date = has_server = False
        try:
            if not isinstance(status, str) or not valid_status(status):
                raise _BadResponse(f"invalid status {status!r}")
            for field in headers:
                try:
                    cached = _field_cache.get(field)
                except TypeError:  # a list, not a tuple: validated below
                    cached = None
                if cached is not None:
                    lines.append(cached)
                    continue
                name, value = field
                if (
                    type(name) is str
                    and type(value) is str
                    and value.isdigit()
                    and value.isascii()
                    and name.lower() == "content-length"
                ):
                    # Valid by construction, and different on most responses: not worth caching,
                    # nor two regular expressions.
                    if length is not None:
                        raise _BadResponse(f"invalid or repeated Content-Length {value!r}")
                    length = int(value)
                    lines.append(("content-length", f"{name}: {value}\r\n".encode("ascii")))
                    continue
                if not isinstance(name, str) or not valid_header_name(name):
                    raise _BadResponse(f"invalid response header name {name!r}")
                if not isinstance(value, str) or not valid_header_value(value):
                    # The value may be secret (a cookie): name the field only.
                    raise _BadResponse(f"invalid value for response header {name!r}")
                value = value.strip(" \t")
                lname = name.lower()
                if lname in HOP_BY_HOP:
                    if lname == "connection" and "close" in value.lower():
                        app_close = True
                    if lname != "upgrade" or not status.startswith("426"):
                        continue
                    # RFC 9110 section 15.5.22: a 426 must say which protocol to switch to.
                if lname == "content-length":
                    if length is not None or not value.isdigit() or not value.isascii():
                        raise _BadResponse(f"invalid or repeated Content-Length {value!r}")
                    length = int(value)
                elif lname == "date":
                    has_date = True
                elif lname == "server":
                    has_server = True
                try:
                    line = f"{name}: {value}\r\n".encode("latin-1")
                except UnicodeEncodeError:
                    raise _BadResponse(f"response header {name!r} is not latin-1") from None
                lines.append((lname, line))
                if (
                    lname not in _UNCACHED_FIELDS
                    and type(field) is tuple
                    and len(_field_cache) < _FIELD_CACHE_MAX
                ):
                    _field_cache[field] = (lname, line)
        except _BadResponse as exc:
            self.bad_response = str(exc)
            raise ValueError(self.bad_response) from None
        code = int(status[:3])
        if code == 101 and WEBSOCKET_KEY not in self.environ:
            # Only a WebSocket handshake can be upgraded here (async_handler.contract).
            self.bad_response = "101 Switching Protocols without a WebSocket handshake"
            raise ValueError(self.bad_response)
        self.status = status
        self.status_code = code
        self.headers = list(headers)
        self._lines = lines
        self._app_length = length
        self.app_close = app_close
        self.has_date = has_date
        self.has_server = has_server
        # RFC 9110 sections 9.3.2, 15.2, 15.3.5, 15.4.5: no content for these.
        self.no_body = self.head or code < 200 or code in (204, 304)
        return self.write

    def write(self, data: bytes) -> None:
        """PEP 3333 ``write()``: send ``data`` now (before anything the iterable yields).

        From a pool thread it blocks until the data is handed to a writable transport (so it
        applies back-pressure); on the loop it queues the data without waiting.  Raises
        :class:`ClientDisconnected` once the client is gone.
        """
        if self.status is None:
            raise AssertionError("write() called before start_response() (PEP 3333)")
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"write() takes bytes, not {type(data).__name__}")
        proto = self.proto
        if threading.get_ident() == proto.loop_thread:
            self.emit(bytes(data), final=False)
        else:
            asyncio.run_coroutine_threadsafe(self.send(bytes(data)), proto.loop).result()

    # -- on the loop

    def emit(self, data: bytes, *, final: bool) -> None:
        """Write body ``data`` (with the head first, if not sent yet) in one transport write.

        With ``final`` it also ends the body; the head then carries ``Content-Length`` computed
        from ``data`` when the application gave none.
        """
        proto = self.proto
        if proto.flow.lost or proto.transport.is_closing():
            raise ClientDisconnected("the connection is closed")
        parts: list[bytes] = []
        if not self.headers_sent:
            parts.append(self._head(len(data) if final else None))
        if data and not self.no_body:
            length = self.content_length
            if length is not None and len(data) > length - self.bytes_sent:
                # Like gunicorn: never send more than the announced length.
                data = data[: max(0, length - self.bytes_sent)]
            if data:
                self.bytes_sent += len(data)
                if self.chunked:
                    parts.append(b"%x\r\n" % len(data))
                    parts.append(data)
                    parts.append(b"\r\n")
                else:
                    parts.append(data)
        if final:
            self.finished = True
            if self.chunked:
                parts.append(b"0\r\n\r\n")
            elif (
                self.content_length is not None
                and not self.no_body
                and self.bytes_sent < self.content_length
            ):
                # The client would wait for bytes that never come: the only honest end is close.
                proto.log.error(
                    "Response to %s %s ended after %d of %d bytes of its Content-Length; "
                    "closing the connection",
                    self.method,
                    self.environ.get("RAW_URI", ""),
                    self.bytes_sent,
                    self.content_length,
                )
                self.keep_alive = False
        if parts:
            proto.transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    async def send(self, data: bytes) -> None:
        """Write a body chunk and wait while the transport is above its high-water mark."""
        self.emit(data, final=False)
        await self.proto.drain()

    async def finish(self) -> None:
        """End the response body (head first if nothing was sent)."""
        self.emit(b"", final=True)
        await self.proto.drain()

    def raw_prefix(self, count: int) -> tuple[bytes, int]:
        """Account for ``count`` raw body bytes about to be written (sendfile).

        Returns the bytes to write first (head, chunk size) and how many body bytes to send.
        """
        parts: list[bytes] = []
        if not self.headers_sent:
            parts.append(self._head(count))
        if self.no_body:
            return b"".join(parts), 0
        if self.content_length is not None:
            count = max(0, min(count, self.content_length - self.bytes_sent))
        if self.chunked and count:
            parts.append(b"%x\r\n" % count)
        self.bytes_sent += count
        return b"".join(parts), count

    def _head(self, known_length: int | None) -> bytes:
        if self.bad_response is not None:
            raise _BadResponse(self.bad_response)
        status = self.status
        if status is None:
            raise RuntimeError("the application did not call start_response() (PEP 3333)")
        code = self.status_code
        proto = self.proto
        state = proto.state
        # RFC 9110 section 8.6: never Content-Length on 1xx or 204; keep the application's for
        # HEAD and 304 (it describes the representation), but do not compute one for 304.
        forbid_length = code < 200 or code == 204
        length = None if forbid_length else self._app_length
        computed = False
        if length is None and known_length is not None and not forbid_length and code != 304:
            length = known_length
            computed = True
        if length is None and not self.no_body:
            if self.http10:
                # RFC 9112 section 6.3: an HTTP/1.0 client cannot read chunked; the end of the
                # body is the end of the connection.
                self.keep_alive = False
            else:
                self.chunked = True
        self.content_length = None if self.no_body and length is None else length
        keep = (
            self.keep_alive
            and not self.app_close
            and not proto.closes_after(self)
            and not state.shutting_down
        )
        self.keep_alive = keep
        parts = [status_line(status)]
        if not self.has_server:
            parts.append(state.server_header)
        if not self.has_date:
            parts.append(state.date.line())
        if not keep:
            parts.append(b"Connection: close\r\n")
        elif self.http10:
            parts.append(b"Connection: keep-alive\r\n")
        for lname, line in self._lines:
            if forbid_length and lname == "content-length":
                continue
            parts.append(line)
        if computed:
            parts.append(b"Content-Length: %d\r\n" % length)  # type: ignore[str-format]
        if self.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        parts.append(b"\r\n")
        self.headers_sent = True
        return b"".join(parts)

    def arm_timeout(self, timeout: float) -> None:
        """Cancel the request (and answer 503) if no status is chosen within ``timeout``."""
        self.timeout = timeout
        self.timeout_handle = self.proto.loop.call_later(timeout, self._timeout_expired)

    def _timeout_expired(self) -> None:
        self.timeout_handle = None
        task = self.task
        if self.status is None and not self.closing and task is not None and not task.done():
            self.timed_out = True
            task.cancel()

    def close_input(self) -> None:
        """Discard the spooled body (temporary file included)."""
        if self.spool is not None:
            self.spool.close()
        else:
            stream = self.environ.get("wsgi.input")
            if isinstance(stream, io.BytesIO):
                stream.close()
