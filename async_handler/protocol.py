"""HTTP/1.1 for WSGI applications on an asyncio event loop, parsed by ``httptools`` (llhttp).

One :class:`HttpProtocol` serves one connection; a :class:`RequestCycle` serves one request on
it; a :class:`ServerState` is shared by all connections of a worker.  The whole request body is
received (spooled to memory or a temporary file) before the application is called, so an
application never waits on a slow client while holding a thread.

Applications that honour :mod:`async_handler.contract` are called on the loop and awaited in a
task per request; every other WSGI application is called, and its body iterated, on one leased
thread of the :class:`~async_handler.threads.ThreadPool` per request.

This module imports only the standard library, ``httptools`` and the two stdlib-only modules of
this package, so it serves any WSGI application; :mod:`async_handler.worker` adapts it to
gunicorn and :func:`serve` runs it stand-alone.

Where it deliberately differs from gunicorn's own parser (all stricter, none looser):

* HTTP/1.1 requests without ``Host`` are refused (RFC 9112 section 3.2); so are two ``Host``
  or two ``Content-Length`` fields, even equal ones, and ``Content-Length`` with
  ``Transfer-Encoding``.
* llhttp accepts only registered methods, ASCII request targets and no whitespace inside chunk
  extensions, and refuses obsolete line folding.  A request line must use single spaces.
  Trailer fields are read and dropped, never merged into the environ; one that RFC 9110
  section 6.5.1 forbids in a trailer (``Host``, framing, authentication) is refused with 400.
* Header names containing ``_`` are always dropped (gunicorn's ``header_map="drop"``).
* A path outside the configured ``SCRIPT_NAME`` is answered 404 (gunicorn answers 500), and
  ``SCRIPT_NAME`` never comes from a request header.
* A client that closes its sending side is treated as gone: its request is cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import http
import io
import logging
import os
import socket
import ssl as _ssl
import stat
import sys
import threading
import time
import types
import urllib.parse
from collections.abc import Callable, Mapping
from typing import IO, Any, Protocol, cast

import httptools

from ._flow import FlowControl
from ._http import (
    FORBIDDEN_TRAILERS,
    HOP_BY_HOP,
    BodySpool,
    DateHeader,
    Refusal,
    TrustedPeers,
    error_response,
    status_line,
    valid_header_name,
    valid_header_value,
    valid_status,
)
from .contract import ASYNC_KEY, AWAITABLE_ATTR, POOL_KEY
from .threads import Lease, ThreadPool

__all__ = [
    "STATS",
    "FileWrapper",
    "HttpProtocol",
    "RequestCycle",
    "Server",
    "ServerConfig",
    "ServerState",
    "serve",
]

#: Process-wide counters, updated only when the kernel's ``sendfile`` really sent a file body (not
#: when the copy fallback did), so that an application can report them in tests.
STATS: dict[str, int] = {"sendfile_calls": 0, "sendfile_bytes": 0}

ExcInfo = tuple[type[BaseException], BaseException, types.TracebackType | None]
Environ = dict[str, Any]
StartResponse = Callable[..., Callable[[bytes], None]]
#: ``on_request_start(environ)``: runs on the loop just before the application is called.
OnRequestStart = Callable[[Environ], None]
#: ``on_request_end(environ, status, response_headers, body_bytes_sent, duration_s)``: runs on the
#: loop once the response is complete or abandoned (``status`` is ``"499 Client Closed Request"``
#: when the client left before a status was chosen).
OnRequestEnd = Callable[[Environ, str, list[tuple[str, str]], int, float], None]


class Logger(Protocol):
    """What the protocol logs through: a :class:`logging.Logger` or gunicorn's ``log``."""

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None: ...
    def info(self, msg: str, *args: Any, **kwargs: Any) -> None: ...
    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None: ...
    def error(self, msg: str, *args: Any, **kwargs: Any) -> None: ...
    def exception(self, msg: str, *args: Any, **kwargs: Any) -> None: ...


def _default_secure_scheme_headers() -> dict[str, str]:
    # gunicorn's default for secure_scheme_headers.
    return {"X-FORWARDED-PROTOCOL": "ssl", "X-FORWARDED-PROTO": "https", "X-FORWARDED-SSL": "on"}


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Every knob of the protocol; immutable, shared by all connections of a server.

    Sizes are in bytes and times in seconds.  The defaults are gunicorn's where gunicorn has the
    setting, so the worker can map gunicorn's configuration one to one.
    """

    #: Idle time allowed between requests on a kept-alive connection (gunicorn ``keepalive``).
    #: ``0`` disables keep-alive: every response closes its connection.
    keepalive: float = 2.0
    #: Slowloris guard: time allowed from a request's first byte to the end of its head, and for
    #: the first request of a connection from the moment it opens.  Expiry answers 408 (or just
    #: closes when nothing was received).  nginx's ``client_header_timeout`` defaults to 60 s;
    #: 10 s is ample for any real client on a LAN or the Internet.
    header_timeout: float = 10.0
    #: A contract (async) application that has not called ``start_response`` within this time is
    #: cancelled and answered 503.  ``None`` disables it.  Sync applications cannot be
    #: interrupted in their thread, so it does not apply to them.
    request_timeout: float | None = None
    #: Longest request line, else 414 (gunicorn ``limit_request_line``; ``0`` = no limit of its
    #: own, the head-size guard still applies).
    limit_request_line: int = 4094
    #: Most header fields in a request, else 431 (gunicorn ``limit_request_fields``).
    limit_request_fields: int = 100
    #: Longest ``name: value`` field, else 431 (gunicorn ``limit_request_field_size``).
    limit_request_field_size: int = 8190
    #: Largest request body; a larger ``Content-Length`` is answered 413 from the head alone,
    #: before any body is read; a chunked body is cut off with 413 as soon as it exceeds it.
    #: ``0`` disables the limit.  100 MiB is far above form posts and leaves uploads possible.
    max_body_size: int = 100 * 1024 * 1024
    #: Bodies up to this size stay in memory; larger ones go to a temporary file.
    spool_threshold: int = 1024 * 1024
    #: ``SCRIPT_NAME`` for every request (a path prefix without trailing slash, or ``""``).
    #: Never read from the request: a client must not choose where the application is mounted.
    script_name: str = ""
    #: Peers (addresses or networks, or ``"*"``) trusted to set ``secure_scheme_headers``;
    #: gunicorn ``forwarded_allow_ips``.  Unix-socket peers are always trusted, as in gunicorn.
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1")
    #: Upper-cased header name -> value meaning https (gunicorn ``secure_scheme_headers``).
    secure_scheme_headers: Mapping[str, str] = dataclasses.field(
        default_factory=_default_secure_scheme_headers
    )
    #: Force ``wsgi.url_scheme = "https"`` (e.g. TLS terminated by the listening socket's
    #: owner); a TLS transport sets it by itself.
    is_ssl: bool = False
    #: ``wsgi.multiprocess``.
    multiprocess: bool = False
    #: ``SERVER_SOFTWARE`` in the environ.
    server_software: str = "async-handler"
    #: The ``Server`` response header; ``None`` uses ``server_software``, ``""`` sends none
    #: (an application's own ``Server`` header always wins).
    server_header: str | None = None
    #: Transport write-buffer high-water mark: a response waits (``drain``) above it, so a slow
    #: client holds at most this much of a response in memory (asyncio's own default is 64 KiB).
    write_buffer_high: int = 64 * 1024
    #: A client that accepts no response bytes for this long is dropped (nginx ``send_timeout``,
    #: 60 s): otherwise a client that never reads pins its response and task forever.
    #: ``None`` disables it.
    send_timeout: float | None = 60.0
    #: After refusing a request, keep reading and discarding for up to this long before closing,
    #: so that the client reads the error instead of a TCP reset (nginx ``lingering_time``
    #: idea, much shorter).
    linger_timeout: float = 2.0

    def __post_init__(self) -> None:
        for name in (
            "keepalive",
            "header_timeout",
            "limit_request_line",
            "limit_request_fields",
            "limit_request_field_size",
            "max_body_size",
            "spool_threshold",
            "linger_timeout",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"ServerConfig.{name} must be a number >= 0, got {value!r}")
        if self.header_timeout <= 0:
            raise ValueError(f"ServerConfig.header_timeout must be > 0, got {self.header_timeout}")
        if self.send_timeout is not None and self.send_timeout <= 0:
            raise ValueError(
                f"ServerConfig.send_timeout must be > 0 or None, got {self.send_timeout}"
            )
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(
                f"ServerConfig.request_timeout must be > 0 or None, got {self.request_timeout}"
            )
        if self.write_buffer_high < 1:
            raise ValueError("ServerConfig.write_buffer_high must be >= 1")
        if self.script_name.endswith("/") or (
            self.script_name and not self.script_name.startswith("/")
        ):
            raise ValueError(
                f"ServerConfig.script_name must be empty or '/prefix' without a trailing slash, "
                f"got {self.script_name!r}"
            )
        if isinstance(self.forwarded_allow_ips, str):
            raise TypeError("ServerConfig.forwarded_allow_ips must be a tuple of strings")
        TrustedPeers(self.forwarded_allow_ips)  # validates every entry

    @property
    def max_head_size(self) -> int:
        """Bytes a request head may take before it is refused as too large (431).

        Bounds what the parser buffers for a field that never ends; the per-field limits give
        the precise answer for well-formed heads.
        """
        fields = self.limit_request_fields or 32768
        field = self.limit_request_field_size or 8190
        line = self.limit_request_line or 1024 * 1024
        return max(line + fields * (field + 2) + 4, 64 * 1024)


class FileWrapper:
    """``wsgi.file_wrapper`` (PEP 3333): a file body the server may send with ``sendfile``.

    Iterating it reads ``blksize`` bytes at a time (the fallback for TLS, non-file objects or a
    loop without ``sendfile``).  Instances accept extra attributes, so an application may set an
    ``aclose`` coroutine function on one; the server then awaits it instead of calling
    :meth:`close`.
    """

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.blksize = blksize

    def __iter__(self) -> FileWrapper:
        return self

    def __next__(self) -> bytes:
        data: bytes = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration

    def close(self) -> None:
        """Close the wrapped file, if it can be closed."""
        close = getattr(self.filelike, "close", None)
        if close is not None:
            close()


class ClientDisconnected(ConnectionError):
    """Raised to the sender (and to a sync application's ``write()``) once the client is gone."""


class _BadResponse(Exception):
    """The application's status or headers cannot be written (RFC 9110 field syntax)."""


class _BrokenFraming(Exception):
    """The body already sent cannot be completed; the connection must be closed."""


class _StopParsing(Exception):
    """Raised from a parser callback to leave ``feed_data``: no further request is wanted."""


_DONE = object()
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_INTERNAL_ERROR = "500 Internal Server Error"
_CLIENT_GONE = "499 Client Closed Request"
# Graceful shutdown: how long a freshly accepted, still silent connection may take to send its
# first request (it may be in flight already).  Short, since browsers open speculative
# connections that never send anything.
_SHUTDOWN_GRACE = 2.0
# Pipelining: requests parsed ahead of the one being answered before the rest of the input is
# parked and reading pauses.  Browsers never pipeline; tools that do send a handful at a time.
_MAX_QUEUED = 8
# Parser input step outside a body.  Bounds how many tiny requests one step can add past
# _MAX_QUEUED (about 200 of 18 bytes), hence the memory a pipelining client can pin.
_FEED_STEP = 4096


def _next_chunk(iterator: Any) -> Any:
    try:
        return next(iterator)
    except StopIteration:
        return _DONE


# Validated response fields by (name, value): the same few recur on nearly every response, and
# checking them costs more than the rest of start_response.  Fields that start_response treats
# specially are never cached; the bound keeps per-response values (cookies, ETags) from growing
# it without limit.
_FIELD_CACHE_MAX = 512
_field_cache: dict[tuple[str, str], tuple[str, bytes]] = {}
_UNCACHED_FIELDS = HOP_BY_HOP | {"content-length", "date", "server"}


class ServerState:
    """State shared by every connection of one server (one gunicorn worker).

    All methods run on the event loop.  ``connections`` holds the live :class:`HttpProtocol`
    instances; ``total_requests`` counts requests handed to the application.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        pool: ThreadPool | None = None,
        log: Logger | None = None,
        on_request_start: OnRequestStart | None = None,
        on_request_end: OnRequestEnd | None = None,
        errors: IO[str] | None = None,
    ) -> None:
        self.config = config if config is not None else ServerConfig()
        self.pool = pool
        self.log: Logger = log if log is not None else logging.getLogger("async_handler.protocol")
        self.on_request_start = on_request_start
        self.on_request_end = on_request_end
        #: ``wsgi.errors`` for every request.
        self.errors: IO[str] = errors if errors is not None else sys.stderr
        self.connections: set[HttpProtocol] = set()
        self.total_requests = 0
        self.shutting_down = False
        self.trusted = TrustedPeers(self.config.forwarded_allow_ips)
        self.date = DateHeader()
        software = self.config.server_header
        if software is None:
            software = self.config.server_software
        self.server_header = (
            b"Server: " + software.encode("latin-1") + b"\r\n" if software else b""
        )
        self._waiters: list[asyncio.Future[None]] = []

    def shutdown(self) -> None:
        """Graceful shutdown: no new requests; idle connections close now, busy ones after
        their request in flight (answered with ``Connection: close``)."""
        self.shutting_down = True
        for conn in list(self.connections):
            conn.shutdown()

    def abort(self) -> None:
        """Quick shutdown: drop every connection now (requests in flight are cancelled)."""
        self.shutting_down = True
        for conn in list(self.connections):
            conn.abort()

    async def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until no connection is left; return ``False`` if ``timeout`` expired first."""
        return await self.wait_below(1, timeout)

    async def wait_below(self, limit: int, timeout: float | None = None) -> bool:
        """Wait until fewer than ``limit`` connections are live; ``False`` on timeout."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while len(self.connections) >= limit:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                if deadline is None:
                    await waiter
                else:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        return False
                    await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return False
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return True

    def _add(self, conn: HttpProtocol) -> None:
        self.connections.add(conn)

    def _remove(self, conn: HttpProtocol) -> None:
        self.connections.discard(conn)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


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
        self.continue_pending = False
        self.declared_length = 0
        self.task: asyncio.Task[None] | None = None
        self.started = 0.0
        self.timeout_handle: asyncio.TimerHandle | None = None
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
                    continue
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
        self.timeout_handle = self.proto.loop.call_later(timeout, self._timeout_expired)

    def _timeout_expired(self) -> None:
        self.timeout_handle = None
        task = self.task
        if self.status is None and task is not None and not task.done():
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


class HttpProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection: parses requests, runs them in order, writes the responses.

    Keep-alive and pipelining are supported; responses leave in request order, and reading
    pauses while a second request waits, so a client cannot make the server parse ahead without
    bound.  Any request the server refuses itself (malformed, over a limit) is answered with a
    specific reason and ``Connection: close``; nothing behind it is processed.  Protocol
    callbacks never raise.
    """

    def __init__(self, app: Callable[..., Any], state: ServerState) -> None:
        # per server
        self.app = app
        self.state = state
        self.config = state.config
        self.log = state.log
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self._async_app = getattr(app, AWAITABLE_ATTR, False) is True
        # per connection
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.flow: FlowControl = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.peer: Any = None
        self._base_environ: Environ = {}
        self._unix = False
        self._trusted = False
        self._scheme = "http"
        self._cycles: collections.deque[RequestCycle | _Refused] = collections.deque()
        self._header_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._parse_stopped = False
        self._close_started = False
        self._shutting_down = False
        self._eof = False
        # per request, while it is being received
        self._receiving: RequestCycle | None = None
        self._in_head = False
        self._head_bytes = 0
        self._body_bytes = 0
        self._url: list[bytes] = []
        self._url_size = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._fields = 0
        self._refusal: Refusal | None = None
        self._last_rx = 0.0
        self._upgrade_body: RequestCycle | None = None
        self._requests_seen = 0
        self._backlog = b""
        # the parser input holding the current request line (see _check_request_line)
        self._piece: memoryview = memoryview(b"")
        self._line_parts: list[memoryview] = []

    def closes_after(self, cycle: RequestCycle) -> bool:
        """Whether the connection closes after ``cycle``'s response (nothing is read after it,
        or the server is shutting down)."""
        if self._shutting_down:
            return True
        return (self._eof or self._parse_stopped) and bool(self._cycles) and (
            self._cycles[-1] is cycle
        )

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Set up per-connection state and start the first request's header timer."""
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.flow = FlowControl(transport)
        config = self.config
        state = self.state
        transport.set_write_buffer_limits(high=config.write_buffer_high)
        peer = transport.get_extra_info("peername")
        sockname = transport.get_extra_info("sockname")
        self.peer = peer
        self._scheme = (
            "https"
            if config.is_ssl or transport.get_extra_info("sslcontext") is not None
            else "http"
        )
        env: Environ = {
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": self._scheme,
            "wsgi.errors": state.errors,
            "wsgi.multithread": True,
            "wsgi.multiprocess": config.multiprocess,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
            "wsgi.file_wrapper": FileWrapper,
            "SERVER_SOFTWARE": config.server_software,
            "SCRIPT_NAME": config.script_name,
        }
        if isinstance(peer, tuple):
            env["REMOTE_ADDR"] = str(peer[0])
            env["REMOTE_PORT"] = str(peer[1])
            self._trusted = peer[0] in state.trusted
        else:
            # A Unix-socket peer has no address; gunicorn trusts it for forwarded headers.
            env["REMOTE_ADDR"] = peer if isinstance(peer, str) else ""
            self._trusted = True
        if isinstance(sockname, tuple):
            env["SERVER_NAME"] = str(sockname[0])
            env["SERVER_PORT"] = str(sockname[1])
        else:
            self._unix = True
        self._base_environ = env
        state._add(self)
        self._header_timer = self.loop.call_later(config.header_timeout, self._header_timeout)
        if state.shutting_down:
            # Accepted just before the shutdown: its first request may already be on the wire.
            self.shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        """Cancel whatever runs for this connection and release its resources."""
        self.flow.connection_lost()
        self._parse_stopped = True
        self._cancel_timers()
        for item in self._cycles:
            if isinstance(item, RequestCycle):
                task = item.task
                if task is not None:
                    if not task.done():
                        task.cancel()
                else:
                    item.close_input()
        if self._receiving is not None and self._receiving not in self._cycles:
            self._receiving.close_input()
        self.state._remove(self)

    def eof_received(self) -> bool:
        """The client closed its side: treat it as gone (as uvicorn and nginx do by default).

        A half-closing client cannot be told apart from one that left until a write fails;
        cancelling at once frees the application's resources, which matters more.
        """
        self._eof = True
        self._stop_parsing()
        return False

    def pause_writing(self) -> None:
        """Transport buffer above the high-water mark: senders wait in ``drain``."""
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        """Transport buffer drained: senders continue."""
        self.flow.resume_writing()

    def data_received(self, data: bytes) -> None:
        """Feed the parser; refusals become queued error answers (never an exception)."""
        try:
            self._data_received(data)
        except Exception:
            # A bug must cost this connection only, never the loop's other connections.
            self.log.exception("Internal error on the connection from %s", self._peer_text())
            self.abort()

    def _data_received(self, data: bytes) -> None:
        if self._upgrade_body is not None:
            self._last_rx = self.loop.time()
            self._feed_upgrade_body(data)
            return
        if self._backlog:
            self._backlog += data  # a read that raced pause_reading
            return
        if self._parse_stopped:
            return  # lingering after a refusal, or no more requests wanted: discard
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._feed_all(data)

    def _feed_all(self, data: bytes) -> None:
        """Feed ``data`` to the parser in small steps, parking the rest (and pausing reading)
        once enough requests wait: llhttp cannot be paused from a callback, and one read of
        tiny pipelined requests would otherwise become thousands of queued environs."""
        view = memoryview(data)
        while view:
            if self._parse_stopped:
                return
            if len(self._cycles) > _MAX_QUEUED:
                self._backlog = bytes(view)
                self.flow.pause_reading()
                return
            step = _FEED_STEP
            receiving = self._receiving
            if receiving is not None and not self._in_head and receiving.spool is not None:
                # Inside a body: its known remainder cannot hold a request, feed it at once.
                step = max(step, receiving.declared_length - receiving.spool.size)
            piece, view = view[:step], view[step:]
            self._feed_piece(piece)
            pending = self._upgrade_body
            if pending is not None:
                if view:
                    self._feed_upgrade_body(bytes(view))
                if self._upgrade_body is pending and self._cycles[0] is pending:
                    self.flow.resume_reading()
                return

    def _feed_piece(self, data: memoryview) -> None:
        head_before = self._in_head
        body_before = self._receiving is not None and not self._in_head
        if body_before:
            self._last_rx = self.loop.time()
        self._piece = data
        if head_before:
            self._line_parts.append(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # Upgrade or CONNECT: the request itself is answered, but we speak no other
            # protocol, so nothing after it (and its body) on this connection is HTTP for us.
            self._stop_parsing()
            if self._upgrade_body is not None:
                self._feed_upgrade_body(bytes(data[exc.args[0] :]))
            return
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _StopParsing):
                return
            refusal = self._refusal or (
                exc.__context__ if isinstance(exc.__context__, Refusal) else None
            )
            if refusal is None:
                self.log.error(
                    "Internal error while parsing a request from %s",
                    self._peer_text(),
                    exc_info=(type(exc), exc, exc.__traceback__),
                )
                refusal = Refusal(500, "Internal error while parsing the request")
            self._refuse(refusal.status, refusal.reason)
            return
        except httptools.HttpParserInvalidMethodError as exc:
            self._refuse(400, f"Invalid request method ({exc})")
            return
        except httptools.HttpParserInvalidURLError as exc:
            self._refuse(400, f"Invalid request target ({exc})")
            return
        except httptools.HttpParserError as exc:
            self._refuse(400, f"Malformed request ({exc})")
            return
        if head_before and self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.config.max_head_size:
                self._refuse(431, "Request head too large")
        elif body_before and self._receiving is not None and not self._in_head:
            # httptools keeps a trailer field in memory until it ends; bound the raw bytes of
            # a body (framing and trailers included) by the body limit.
            self._body_bytes += len(data)
            limit = self.config.max_body_size
            if limit and self._body_bytes > 2 * limit + 1024 * 1024:
                self._refuse(413, "Request body too large")

    # -- httptools callbacks (called from feed_data; exceptions become parser errors)

    def on_message_begin(self) -> None:
        """A new request starts: reset per-request parse state, arm the header timer."""
        if self._parse_stopped:
            # Pipelined behind a request after which the connection closes: not processed.
            raise _StopParsing
        self._in_head = True
        self._line_parts = [self._piece]
        self._head_bytes = 0
        self._body_bytes = 0
        self._url = []
        self._url_size = 0
        self._headers = []
        self._fields = 0
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(
                self.config.header_timeout, self._header_timeout
            )

    def on_url(self, url: bytes) -> None:
        """Collect the request target; enforce ``limit_request_line`` as it grows."""
        self._url.append(url)
        self._url_size += len(url)
        limit = self.config.limit_request_line
        # The whole line is "METHOD SP target SP HTTP/1.1"; count its fixed parts too.
        if limit and self._url_size + len(self.parser.get_method()) + 10 > limit:
            self._fail_parse(414, f"Request line longer than {limit} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        """Collect a header field (or a trailer field, which is counted, checked, dropped)."""
        config = self.config
        self._fields += 1
        limit = config.limit_request_fields
        if limit and self._fields > limit:
            self._fail_parse(431, f"More than {limit} header fields")
        size_limit = config.limit_request_field_size
        # The whole field line, "name: value" and its CRLF, as gunicorn counts it.
        if size_limit and len(name) + len(value) + 4 > size_limit:
            self._fail_parse(431, f"Header field longer than {size_limit} bytes")
        if self._in_head:
            self._headers.append((name, value))
        elif name.lower() in FORBIDDEN_TRAILERS:
            self._fail_parse(400, f"Trailer field {name.decode('latin-1')!r} is forbidden")

    def on_headers_complete(self) -> None:
        """Validate the head (RFC 9112 strictness beyond llhttp), build the environ, queue."""
        self._in_head = False
        self._requests_seen += 1
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        try:
            cycle = self._build_cycle()
        except Refusal as refusal:
            self._refusal = refusal
            raise
        self._receiving = cycle
        self._cycles.append(cycle)
        if cycle.spool is not None:
            # The slowloris guard continues through the body: each gap between received
            # pieces may last at most header_timeout.
            self._last_rx = self.loop.time()
            self._header_timer = self.loop.call_later(
                self.config.header_timeout, self._body_timeout
            )
        if cycle.continue_pending and self._cycles[0] is cycle:
            cycle.continue_pending = False
            self.transport.write(_CONTINUE)
        if len(self._cycles) > 1:
            # One request runs, this one waits: stop reading until the first is answered.
            self.flow.pause_reading()

    def on_body(self, body: bytes) -> None:
        """Spool a piece of the (de-chunked) body; a chunked body over the limit is refused."""
        cycle = self._receiving
        if cycle is None or cycle.spool is None:  # pragma: no cover - llhttp framing
            return
        spool = cycle.spool
        limit = self.config.max_body_size
        if limit and spool.size + len(body) > limit:
            self._fail_parse(413, f"Request body larger than {limit} bytes")
        spool.write(body)
        cycle.continue_pending = False

    def on_message_complete(self) -> None:
        """The body is complete: hand the request to the application when its turn comes."""
        cycle = self._receiving
        if cycle is None:  # pragma: no cover - llhttp calls this after on_headers_complete
            return
        if (
            self.parser.should_upgrade()
            and cycle.spool is not None
            and cycle.spool.size < cycle.declared_length
        ):
            # llhttp hands an upgrade request's body over as "the other protocol" (e.g. curl
            # --http2 POSTs with Upgrade: h2c): read its Content-Length ourselves.
            self._upgrade_body = cycle
            return
        self._complete(cycle)

    def _feed_upgrade_body(self, data: bytes) -> None:
        cycle = self._upgrade_body
        if cycle is None or cycle.spool is None:  # pragma: no cover - set together
            return
        missing = cycle.declared_length - cycle.spool.size
        cycle.spool.write(data[:missing])
        cycle.continue_pending = False
        if cycle.spool.size >= cycle.declared_length:
            self._upgrade_body = None
            self._complete(cycle)
            self._stop_parsing()

    def _complete(self, cycle: RequestCycle) -> None:
        self._receiving = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if cycle.spool is not None:
            cycle.environ["wsgi.input"] = cycle.spool.finish()
            if "CONTENT_LENGTH" not in cycle.environ:
                # De-chunked body: give the application its length (PEP 3333 readers rely on
                # CONTENT_LENGTH; wsgi.input_terminated covers the others).
                cycle.environ["CONTENT_LENGTH"] = str(cycle.spool.size)
        cycle.complete = True
        cycle.continue_pending = False
        if self._shutting_down or not cycle.keep_alive:
            self._stop_parsing()
        if self._cycles and self._cycles[0] is cycle:
            self._start(cycle)

    # -- request head validation and environ

    def _fail_parse(self, status: int, reason: str) -> None:
        self._refusal = Refusal(status, reason)
        raise self._refusal

    def _build_cycle(self) -> RequestCycle:
        parser = self.parser
        config = self.config
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            if version.startswith("2") or version.startswith("3"):
                raise Refusal(505, f"HTTP version {version} is not supported on HTTP/1 framing")
            raise Refusal(400, f"Invalid HTTP version {version}")
        http10 = version == "1.0"
        raw_method = parser.get_method()
        self._check_request_line(raw_method, version)
        method = raw_method.decode("ascii")
        keep_alive = parser.should_keep_alive() and config.keepalive > 0
        if parser.should_upgrade():
            keep_alive = False
        environ = self._base_environ.copy()
        environ["REQUEST_METHOD"] = method
        environ["SERVER_PROTOCOL"] = "HTTP/1.0" if http10 else "HTTP/1.1"

        host: str | None = None
        hosts = 0
        content_length: str | None = None
        content_type_seen = False
        transfer_encoding: str | None = None
        expect_continue = False
        scheme = self._scheme
        scheme_from: str | None = None
        secure_headers = config.secure_scheme_headers if self._trusted else {}
        for raw_name, raw_value in self._headers:
            name = raw_name.decode("latin-1").upper()
            value = raw_value.decode("latin-1").strip(" \t")
            if name == "HOST":
                hosts += 1
                host = value
            elif name == "CONTENT-LENGTH":
                # llhttp refuses a repeated Content-Length (RFC 9112 section 6.3, item 5).
                content_length = value
                environ["CONTENT_LENGTH"] = value
                continue
            elif name == "CONTENT-TYPE":
                if content_type_seen:
                    # RFC 9110 section 5.3: a singleton field cannot be combined (gunicorn too).
                    raise Refusal(400, "Repeated Content-Type header")
                content_type_seen = True
                environ["CONTENT_TYPE"] = value
                continue
            elif name == "TRANSFER-ENCODING":
                transfer_encoding = (
                    value if transfer_encoding is None else f"{transfer_encoding},{value}"
                )
            elif name == "EXPECT":
                # RFC 9110 section 10.1.1: 100-continue is the only expectation defined; an
                # HTTP/1.0 server must ignore it.
                if value.lower() != "100-continue":
                    raise Refusal(417, f"Unsupported expectation {value!r}")
                expect_continue = not http10
            if name in secure_headers:
                header_scheme = "https" if value == secure_headers[name] else "http"
                if scheme_from is not None and header_scheme != scheme:
                    raise Refusal(400, "Contradictory scheme headers")
                scheme_from = name
                scheme = header_scheme
            if "_" in name:
                # gunicorn header_map="drop": X_Forwarded_For would map to the same key as
                # X-Forwarded-For and let a client smuggle a value past a proxy (RFC 9110
                # section 17.10).
                continue
            key = "HTTP_" + name.replace("-", "_")
            previous = environ.get(key)
            environ[key] = value if previous is None else f"{previous},{value}"
        if hosts > 1:
            raise Refusal(400, "More than one Host header")
        if hosts == 0 and not http10:
            raise Refusal(400, "Missing Host header (required in HTTP/1.1, RFC 9112 section 3.2)")
        environ["wsgi.url_scheme"] = scheme

        chunked = False
        if transfer_encoding is not None:
            codings = [c.strip(" \t").lower() for c in transfer_encoding.split(",")]
            for coding in codings:
                if coding not in ("chunked", "gzip", "x-gzip", "deflate", "compress", "identity"):
                    raise Refusal(501, f"Unsupported transfer coding {coding!r}")
            if codings[-1] != "chunked" or codings.count("chunked") != 1:
                # RFC 9112 section 6.3: a request whose last coding is not chunked has no
                # determinable length.
                raise Refusal(400, "Transfer-Encoding must end with a single 'chunked'")
            if http10:
                # RFC 9112 section 6.1: chunked framing in HTTP/1.0 cannot be trusted.
                raise Refusal(400, "Transfer-Encoding in an HTTP/1.0 request")
            if content_length is not None:
                # RFC 9112 section 6.1: a request smuggling vector; refuse and close.
                raise Refusal(400, "Both Content-Length and Transfer-Encoding")
            if len(codings) > 1:
                # Like gunicorn: a content coding under chunked passes through, but the
                # connection is not reused.
                keep_alive = False
            chunked = True
        length = 0
        if content_length is not None:
            length = int(content_length)  # llhttp accepted only digits
            limit = config.max_body_size
            if limit and length > limit:
                raise Refusal(
                    413, f"Request body of {length} bytes exceeds the limit of {limit} bytes"
                )

        raw_uri = b"".join(self._url)
        environ["RAW_URI"] = raw_uri.decode("latin-1")
        path, query = self._split_target(raw_uri, method)
        environ["QUERY_STRING"] = query
        if self._unix:
            self._server_from_host(environ, host, scheme)
        script_name = config.script_name
        if script_name:
            if path != script_name and not path.startswith(script_name + "/"):
                raise Refusal(404, f"Path is outside SCRIPT_NAME {script_name!r}")
            path = path[len(script_name) :]
        environ["PATH_INFO"] = (
            urllib.parse.unquote_to_bytes(path).decode("latin-1") if "%" in path else path
        )

        has_body = chunked or length > 0
        spool = BodySpool(config.spool_threshold) if has_body else None
        environ["wsgi.input"] = io.BytesIO()
        if chunked and parser.should_upgrade():
            # llhttp would pass the chunked body on undecoded as the upgraded protocol.
            raise Refusal(400, "Upgrade request with a chunked body")
        cycle = RequestCycle(self, environ, method, http10, keep_alive, spool)
        cycle.continue_pending = expect_continue and has_body
        cycle.declared_length = length
        return cycle

    def _check_request_line(self, method: bytes, version: str) -> None:
        # RFC 9112 section 3: request-line = method SP request-target SP HTTP-version, with
        # single spaces.  llhttp tolerates runs of spaces; a proxy in front may split such a
        # line differently, so require the exact form to appear in what was received.
        line = b"%s %s HTTP/%s\r\n" % (method, b"".join(self._url), version.encode("ascii"))
        parts = self._line_parts
        received = parts[0].tobytes() if len(parts) == 1 else b"".join(parts)
        if line not in received:
            raise Refusal(
                400, "Malformed request line (single spaces required, RFC 9112 section 3)"
            )
        self._line_parts = []

    @staticmethod
    def _split_target(target: bytes, method: str) -> tuple[str, str]:
        text = target.decode("latin-1")
        if text.startswith("/"):
            text = text.split("#", 1)[0]
            path, _, query = text.partition("?")
            return path, query
        if text == "*" and method != "OPTIONS":
            # RFC 9112 section 3.2.4: asterisk-form is only for a server-wide OPTIONS.
            raise Refusal(400, "Asterisk-form target with a method other than OPTIONS")
        if text == "*" or method == "CONNECT":
            # asterisk-form and authority-form (RFC 9112 sections 3.2.3, 3.2.4) have no path.
            return ("*" if text == "*" else ""), ""
        # absolute-form (RFC 9112 section 3.2.2): the path and query are the request's.
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            raise Refusal(400, "Invalid absolute-form request target") from None
        if url.schema is None or url.schema.lower() not in (b"http", b"https"):
            raise Refusal(400, "Absolute-form request target without an http(s) scheme")
        path = (url.path or b"/").decode("latin-1")
        query = (url.query or b"").decode("latin-1")
        return path, query

    @staticmethod
    def _server_from_host(environ: Environ, host: str | None, scheme: str) -> None:
        # A Unix socket has no address: like gunicorn, take SERVER_NAME/PORT from Host.
        if not host:
            environ["SERVER_NAME"] = ""
            environ["SERVER_PORT"] = ""
            return
        if host.startswith("["):  # IPv6 literal (RFC 3986 section 3.2.2)
            end = host.find("]") + 1
            name, rest = host[:end], host[end:]
            port = rest[1:] if rest.startswith(":") else ""
        else:
            name, _, port = host.partition(":")
        environ["SERVER_NAME"] = name
        environ["SERVER_PORT"] = port or ("443" if scheme == "https" else "80")

    # -- request scheduling

    def _start(self, cycle: RequestCycle) -> None:
        cycle.started = time.perf_counter()
        self.state.total_requests += 1
        cycle.task = self.loop.create_task(self._serve(cycle))

    def _refuse(self, status: int, reason: str) -> None:
        """Answer ``status`` with ``reason`` after the requests before it; then close."""
        self._refusal = None
        self._stop_parsing()
        self._in_head = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self.log.warning("Invalid request from %s: %s %s", self._peer_text(), status, reason)
        self._upgrade_body = None
        receiving = self._receiving
        if receiving is not None:
            self._receiving = None
            if receiving in self._cycles and receiving.task is None:
                self._cycles.remove(receiving)
                receiving.close_input()
        state = self.state
        self._cycles.append(
            _Refused(error_response(status, reason, state.date.line(), state.server_header))
        )
        if len(self._cycles) == 1:
            self._next()

    def _stop_parsing(self) -> None:
        if not self._parse_stopped:
            self._parse_stopped = True
            if not self.flow.lost:
                self.flow.pause_reading()

    def _next(self) -> None:
        """Start the first queued item, or arm the keep-alive timer when there is none."""
        if self._close_started or self.flow.lost:
            return
        if self._backlog and len(self._cycles) <= _MAX_QUEUED:
            data, self._backlog = self._backlog, b""
            self._feed_all(data)
            if self._close_started or self.flow.lost:
                return
        cycles = self._cycles
        if cycles:
            first = cycles[0]
            if isinstance(first, _Refused):
                cycles.clear()
                self.transport.write(first.payload)
                self._close(linger=True)
                return
            if first.complete:
                if first.task is None:
                    self._start(first)
            elif first.continue_pending:
                first.continue_pending = False
                self.transport.write(_CONTINUE)
            if (
                len(cycles) < 2
                and not self._backlog
                and (not self._parse_stopped or self._upgrade_body is first)
            ):
                self.flow.resume_reading()
            return
        if self._parse_stopped or self._shutting_down:
            self._close()
            return
        if self._backlog:
            return
        self.flow.resume_reading()
        if not self._in_head and self._idle_timer is None:
            self._idle_timer = self.loop.call_later(self.config.keepalive, self._idle_timeout)

    def _cycle_done(self, cycle: RequestCycle) -> None:
        if self._cycles and self._cycles[0] is cycle:
            self._cycles.popleft()
        cycle.close_input()
        if self.flow.lost:
            return
        if not cycle.keep_alive or not cycle.finished or self._shutting_down:
            self._close()
            return
        self._next()

    # -- running one request

    async def _serve(self, cycle: RequestCycle) -> None:
        environ = cycle.environ
        try:
            try:
                hook = self.state.on_request_start
                if hook is not None:
                    hook(environ)
                if self._async_app:
                    await self._run_async(cycle)
                else:
                    await self._run_sync(cycle)
            except asyncio.CancelledError:
                if self.flow.lost:
                    return  # the client left; the application saw the cancellation
                if not cycle.timed_out:
                    raise
                task = cycle.task
                uncancel = getattr(task, "uncancel", None)
                if uncancel is not None:
                    uncancel()
                self.log.warning(
                    "Request timed out after %ss without a response: %s %s",
                    self.config.request_timeout,
                    cycle.method,
                    environ.get("RAW_URI", ""),
                )
                self._answer_error(cycle, 503, "Request timed out")
            except ClientDisconnected:
                if not self.flow.lost:
                    self._close()
            except _BadResponse as exc:
                self.log.error(
                    "Refusing to send an invalid response to %s %s: %s",
                    cycle.method,
                    environ.get("RAW_URI", ""),
                    exc,
                )
                self._answer_error(cycle, 500, "Internal Server Error")
            except _BrokenFraming:
                self._close()
            except Exception as exc:
                if isinstance(exc, ConnectionError) and self.flow.lost:
                    return  # a send raced the disconnect; nobody is left to answer
                self.log.exception(
                    "Error handling request %s %s", cycle.method, environ.get("RAW_URI", "")
                )
                self._answer_error(cycle, 500, "Internal Server Error")
        finally:
            self._request_ended(cycle)

    def _answer_error(self, cycle: RequestCycle, status: int, reason: str) -> None:
        cycle.keep_alive = False
        if self.flow.lost or self.transport.is_closing():
            return
        if cycle.headers_sent:
            # Part of the response is out: only closing tells the client it is incomplete.
            self._close()
            return
        state = self.state
        payload = error_response(status, reason, state.date.line(), state.server_header)
        self.transport.write(payload)
        cycle.headers_sent = True
        cycle.finished = True
        cycle.status = f"{status} {http.HTTPStatus(status).phrase}"
        cycle.headers = [("Content-Type", "text/plain; charset=utf-8")]
        cycle.bytes_sent = len(reason.encode()) + 1

    def _request_ended(self, cycle: RequestCycle) -> None:
        handle = cycle.timeout_handle
        if handle is not None:
            cycle.timeout_handle = None
            handle.cancel()
        hook = self.state.on_request_end
        if hook is not None:
            status = cycle.status or (_CLIENT_GONE if self.flow.lost else _INTERNAL_ERROR)
            try:
                hook(
                    cycle.environ,
                    status,
                    cycle.headers,
                    cycle.bytes_sent,
                    time.perf_counter() - cycle.started,
                )
            except Exception:
                self.log.exception("on_request_end hook failed")
        self._cycle_done(cycle)

    async def _run_async(self, cycle: RequestCycle) -> None:
        environ = cycle.environ
        environ[ASYNC_KEY] = True
        environ[POOL_KEY] = self.state.pool
        timeout = self.config.request_timeout
        if timeout is not None:
            cycle.arm_timeout(timeout)
        body: Any = None
        try:
            body = await self.app(environ, cycle.start_response)
            await self._send_body(cycle, body, None)
        finally:
            if body is not None:
                await self._close_body(body, None)

    async def _run_sync(self, cycle: RequestCycle) -> None:
        pool = self._pool()
        lease = pool.lease()
        body: Any = None
        try:
            future = lease.submit(self.app, cycle.environ, cycle.start_response)
            try:
                body = await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                # The call goes on in its thread; close what it returns there (PEP 3333).
                future.add_done_callback(_close_abandoned)
                raise
            await self._send_body(cycle, body, lease)
        finally:
            if body is not None:
                await self._close_body(body, lease, release=True)
            else:
                lease.release()

    def _pool(self) -> ThreadPool:
        pool = self.state.pool
        if pool is None:
            raise RuntimeError("ServerState.pool is required to run sync code")
        return pool

    async def _off_loop(self, lease: Lease | None, fn: Callable[..., Any], *args: Any) -> Any:
        if lease is not None:
            return await lease.run(fn, *args)
        return await asyncio.wrap_future(self._pool().run(fn, *args))

    async def _send_body(self, cycle: RequestCycle, body: Any, lease: Lease | None) -> None:
        if isinstance(body, (list, tuple)):
            for chunk in body:
                if not isinstance(chunk, bytes):
                    raise TypeError(f"response body items must be bytes, not {type(chunk)}")
            cycle.emit(body[0] if len(body) == 1 else b"".join(body), final=True)
            await self.drain()
            return
        if isinstance(body, FileWrapper) and await self._send_file(cycle, body, lease):
            return
        if hasattr(body, "__aiter__"):
            async for chunk in body:
                if not isinstance(chunk, (bytes, bytearray)):
                    raise TypeError(f"response body items must be bytes, not {type(chunk)}")
                if chunk:
                    await cycle.send(bytes(chunk))
            await cycle.finish()
            return
        if lease is None:
            lease = self._pool().lease()
            try:
                await self._send_iterable(cycle, body, lease)
            finally:
                lease.release()
        else:
            await self._send_iterable(cycle, body, lease)

    async def _send_iterable(self, cycle: RequestCycle, body: Any, lease: Lease) -> None:
        iterator = await lease.run(iter, body)
        while True:
            chunk = await lease.run(_next_chunk, iterator)
            if chunk is _DONE:
                break
            if not isinstance(chunk, (bytes, bytearray)):
                raise TypeError(f"response body items must be bytes, not {type(chunk)}")
            if chunk:
                await cycle.send(bytes(chunk))
        await cycle.finish()

    async def _send_file(
        self, cycle: RequestCycle, wrapper: FileWrapper, lease: Lease | None
    ) -> bool:
        """Send a file body with ``loop.sendfile`` (or a copy of its extent); ``False`` when
        the wrapped object is not a regular file, so the caller iterates it instead."""
        extent = _file_extent(wrapper.filelike)
        if extent is None:
            return False
        fd, offset, count = extent
        if cycle.status is None:
            raise RuntimeError("the application did not call start_response() (PEP 3333)")
        if self.flow.lost or self.transport.is_closing():
            raise ClientDisconnected("the connection is closed")
        prefix, count = cycle.raw_prefix(count)
        if prefix:
            self.transport.write(prefix)
        if count:
            sent = 0
            if self.transport.get_extra_info("sslcontext") is None:
                try:
                    sent = await self.loop.sendfile(
                        self.transport, wrapper.filelike, offset, count, fallback=False
                    )
                except NotImplementedError:
                    # uvloop has no loop.sendfile: drive os.sendfile ourselves.
                    sent = await self._sendfile_dup(fd, offset, count)
                except asyncio.SendfileNotAvailableError:
                    sent = -1
                except (ConnectionError, RuntimeError) as exc:
                    if self.flow.lost or self.transport.is_closing():
                        raise ClientDisconnected("the connection is closed") from exc
                    raise
                if sent >= 0:
                    STATS["sendfile_calls"] += 1
                    STATS["sendfile_bytes"] += sent
            else:
                sent = -1
            if sent < 0:
                sent = await self._copy_file(fd, offset, count, lease)
            if sent != count:
                self.log.error(
                    "File for %s %s ended after %d of %d bytes; closing the connection",
                    cycle.method,
                    cycle.environ.get("RAW_URI", ""),
                    sent,
                    count,
                )
                raise _BrokenFraming
            if cycle.chunked:
                self.transport.write(b"\r\n")
        await cycle.finish()
        return True

    async def _sendfile_dup(self, fd: int, offset: int, count: int) -> int:
        """Zero-copy ``os.sendfile`` from ``fd`` to the connection's socket, on the loop.

        For loops without ``loop.sendfile`` (uvloop).  The socket belongs to the transport, so
        writability is watched on a duplicate descriptor; the kernel writes only while the
        transport's own buffer is empty, so bytes never interleave.  Returns the bytes sent
        (fewer if the file is shorter), or -1 when the transport exposes no socket.
        """
        transport = self.transport
        sock = transport.get_extra_info("socket")
        try:
            sock_fd = sock.fileno() if sock is not None else -1
        except (OSError, ValueError):
            sock_fd = -1
        if sock_fd < 0:
            return -1
        loop = self.loop
        out = os.dup(sock_fd)
        sent = 0
        try:
            while sent < count:
                if self.flow.lost or transport.is_closing():
                    raise ClientDisconnected("the connection is closed")
                if transport.get_write_buffer_size() == 0:
                    try:
                        n = os.sendfile(out, fd, offset + sent, count - sent)
                    except (BlockingIOError, InterruptedError):
                        pass
                    except (BrokenPipeError, ConnectionError) as exc:
                        raise ClientDisconnected("the client closed the connection") from exc
                    else:
                        if n == 0:
                            break  # the file is shorter than announced
                        sent += n
                        continue
                writable: asyncio.Future[None] = loop.create_future()
                loop.add_writer(out, _wake, writable)
                try:
                    await asyncio.wait_for(writable, self.config.send_timeout)
                except TimeoutError:
                    self._send_stalled()
                    raise ClientDisconnected("the client stopped reading") from None
                finally:
                    loop.remove_writer(out)
        finally:
            os.close(out)
        return sent

    async def _copy_file(self, fd: int, offset: int, count: int, lease: Lease | None) -> int:
        """Write ``count`` bytes of ``fd`` from ``offset``, read off the loop; return the
        number written (less if the file is shorter)."""
        sent = 0
        block = 256 * 1024
        while sent < count:
            if self.flow.lost or self.transport.is_closing():
                raise ClientDisconnected("the client closed the connection")
            data: bytes = await self._off_loop(
                lease, os.pread, fd, min(block, count - sent), offset + sent
            )
            if not data:
                break
            self.transport.write(data)
            sent += len(data)
            await self.drain()
        return sent

    async def _close_body(
        self, body: Any, lease: Lease | None, *, release: bool = False
    ) -> None:
        """PEP 3333 / contract: ``await body.aclose()`` if it has one, else ``close()`` off-loop
        (on ``lease`` when given, so a sync app closes on the thread that ran it).  With
        ``release``, the lease is released once the close has run.

        Shielded: a disconnect that cancels the request while it is closing its body must not
        cancel the close itself (the file or generator would leak).
        """
        release_later = False
        try:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await asyncio.shield(aclose())
                return
            close = getattr(body, "close", None)
            if close is not None:
                if lease is not None:
                    future = lease.submit(contextvars.copy_context().run, close)
                    if release:
                        release_later = True
                        future.add_done_callback(lambda _: lease.release())
                else:
                    future = self._pool().run(close)
                await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("Error closing the response body")
        finally:
            if release and lease is not None and not release_later:
                lease.release()

    # -- timers and closing

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._close_started or self.flow.lost:
            return
        if self._in_head:
            self._refuse(408, "Timed out reading the request head")
        elif not self._cycles:
            self._close()  # opened but silent: nobody to answer

    def _body_timeout(self) -> None:
        self._header_timer = None
        cycle = self._receiving
        if cycle is None or self._close_started or self.flow.lost:
            return
        now = self.loop.time()
        timeout = self.config.header_timeout
        if self.flow.read_paused:
            # We are not reading (a request ahead is being answered): the client is not late.
            self._last_rx = now
        idle = now - self._last_rx
        if idle >= timeout:
            self._refuse(408, "Timed out reading the request body")
            return
        self._header_timer = self.loop.call_later(timeout - idle, self._body_timeout)

    def _idle_timeout(self) -> None:
        self._idle_timer = None
        if not self._cycles and not self._in_head:
            self._close()

    def _cancel_timers(self) -> None:
        for handle in (self._header_timer, self._idle_timer):
            if handle is not None:
                handle.cancel()
        self._header_timer = self._idle_timer = None

    def _close(self, linger: bool = False) -> None:
        if self._close_started:
            return
        self._close_started = True
        self._stop_parsing()
        self._cancel_timers()
        transport = self.transport
        if transport.is_closing():
            return
        if linger and self.config.linger_timeout > 0 and transport.can_write_eof():
            # Send FIN after the answer, but keep reading (and discarding) for a while: closing
            # with unread input makes the kernel send RST, which can destroy the answer.
            transport.write_eof()
            self.flow.resume_reading()
            self._idle_timer = self.loop.call_later(self.config.linger_timeout, transport.close)
        else:
            transport.close()

    def shutdown(self) -> None:
        """Graceful: stop reading new requests; close now if idle, else after the request in
        flight (whose response says ``Connection: close``).

        A request still arriving (head or body) counts as in flight.  A connection accepted but
        still silent gets a short grace to send its first request, which may already be on the
        wire: closing it would drop a request the client had every right to send.  Pipelined
        requests not yet started are dropped (RFC 9112 section 9.3.2 lets the client retry).
        """
        if self._shutting_down or self.transport is None:
            return
        self._shutting_down = True
        if self.flow.lost or self._close_started:
            return
        first = self._cycles[0] if self._cycles else None
        if isinstance(first, _Refused):
            return  # closes once the refusal is written
        if first is None:
            if self._in_head:
                return  # answered, then closed (on_message_complete stops parsing)
            if self._requests_seen == 0:
                if self._header_timer is not None:
                    self._header_timer.cancel()
                self._header_timer = self.loop.call_later(
                    min(self.config.header_timeout, _SHUTDOWN_GRACE), self._header_timeout
                )
                return
            self._close()
            return
        for item in list(self._cycles)[1:]:
            self._cycles.remove(item)
            if isinstance(item, RequestCycle):
                item.close_input()
        if first.complete:
            self._stop_parsing()

    def abort(self) -> None:
        """Quick: drop the connection now; a request in flight is cancelled."""
        if self.transport is not None and not self.flow.lost:
            self._close_started = True
            self.transport.abort()

    async def drain(self) -> None:
        """Wait while the transport is above its high-water mark, at most ``send_timeout``;
        a client that stalls longer is dropped (:class:`ClientDisconnected` is raised)."""
        flow = self.flow
        if not flow.write_paused:
            return
        try:
            await asyncio.wait_for(flow.drain(), self.config.send_timeout)
        except TimeoutError:
            self._send_stalled()
            raise ClientDisconnected("the client stopped reading") from None

    def _send_stalled(self) -> None:
        self.log.info(
            "Dropping %s: it read nothing for %ss", self._peer_text(), self.config.send_timeout
        )
        self.abort()

    def _peer_text(self) -> str:
        peer = self.peer
        if isinstance(peer, tuple):
            return f"{peer[0]}:{peer[1]}"
        return str(peer or "unix socket")


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _close_abandoned(future: Any) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    close = getattr(future.result(), "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            logging.getLogger("async_handler.protocol").exception(
                "Error closing an abandoned response body"
            )


def _file_extent(filelike: Any) -> tuple[int, int, int] | None:
    """``(fd, offset, bytes_to_end)`` of a regular file object, else ``None``."""
    try:
        fd = filelike.fileno()
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        offset = filelike.tell()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    return fd, offset, max(0, info.st_size - offset)


class Server:
    """A running :func:`serve` server.

    ``close()`` stops listening and starts a graceful shutdown; ``await wait_closed()`` returns
    when every connection is gone.  Also an async context manager (closes on exit).
    """

    def __init__(
        self,
        server: asyncio.AbstractServer,
        state: ServerState,
        owned_pool: ThreadPool | None,
    ) -> None:
        self._server = server
        self.state = state
        self._owned_pool = owned_pool

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (``sockets[0].getsockname()`` gives the bound port)."""
        return tuple(getattr(self._server, "sockets", ()) or ())

    def close(self) -> None:
        """Stop accepting; finish requests in flight, close idle connections now."""
        self._server.close()
        self.state.shutdown()

    def abort(self) -> None:
        """Stop accepting and drop every connection now."""
        self._server.close()
        self.state.abort()

    async def wait_closed(self, timeout: float | None = None) -> None:
        """Wait for every connection to end; after ``timeout`` seconds, abort the rest.

        Shuts down the thread pool if :func:`serve` created it.
        """
        if not await self.state.wait_closed(timeout):
            self.state.abort()
            await self.state.wait_closed(5.0)
        await self._server.wait_closed()
        if self._owned_pool is not None:
            self._owned_pool.shutdown()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


async def serve(
    app: Callable[..., Any],
    *,
    host: str | None = None,
    port: int | None = None,
    sock: socket.socket | None = None,
    config: ServerConfig | None = None,
    pool: ThreadPool | None = None,
    ssl: _ssl.SSLContext | None = None,
    log: Logger | None = None,
) -> Server:
    """Serve the WSGI application ``app`` on the running loop; return a :class:`Server`.

    Listen on ``sock`` (an already bound socket) or on ``host``/``port`` (``port=0`` picks a free
    one).  ``config`` defaults to :class:`ServerConfig` ``()``; ``pool`` is the thread pool for
    sync code (one of ``min(32, cpus + 4)`` threads is created, and shut down by
    :meth:`Server.wait_closed`, when omitted); ``ssl`` enables TLS; ``log`` receives the
    protocol's messages (a ``logging.Logger``-like object).  The server is accepting when this
    returns.  Stable API: ``manage.py runserver`` and the tests are built on it.
    """
    if sock is not None and (host is not None or port is not None):
        raise ValueError("serve(): pass either sock or host/port, not both")
    config = config if config is not None else ServerConfig()
    owned = None
    if pool is None:
        owned = pool = ThreadPool(min(32, (os.cpu_count() or 1) + 4))
    state = ServerState(config, pool=pool, log=log)
    loop = asyncio.get_running_loop()

    def factory() -> HttpProtocol:
        return HttpProtocol(app, state)

    if sock is not None:
        server = await loop.create_server(factory, sock=sock, ssl=ssl)
    else:
        server = await loop.create_server(factory, host=host, port=port or 0, ssl=ssl)
    return Server(server, state, owned)

