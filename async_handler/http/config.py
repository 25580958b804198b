"""Configuration of the HTTP layer: :class:`ServerConfig`, every limit with its reason, and the
types the other modules share (the environ, the hooks, the logger)."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from .fields import TrustedPeers

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
class WebSocketConfig:
    """The WebSocket limits and timers (RFC 6455), one set for every socket of a server.

    The defaults are those of the ``websockets`` library and uvicorn (20 s pings, 10 s open and
    close timeouts, a 16-message inbound queue) and Daphne's 1 MiB message limit.
    """

    #: Seconds between keep-alive pings (RFC 6455 section 5.5.2); ``None`` sends none.
    ping_interval: float | None = 20.0
    #: A ping unanswered for this long closes the socket with 1011; ``None`` waits forever.
    ping_timeout: float | None = 20.0
    #: Largest message, reassembled and decompressed, else close 1009 (checked from each frame
    #: header, before the payload is buffered); ``None`` disables it.
    max_message: int | None = 1024 * 1024
    #: Messages received but not yet read by the application; above it reading pauses, so a
    #: fast sender is held back by TCP instead of filling memory.
    max_queue: int = 16
    #: The application must accept or refuse a handshake within this time, else 503.
    open_timeout: float = 10.0
    #: After sending a close frame, the peer's is awaited this long before the connection is
    #: dropped.
    close_timeout: float = 10.0
    #: Offer permessage-deflate (RFC 7692), with the small windows ``websockets`` recommends.
    deflate: bool = True

    def __post_init__(self) -> None:
        for name in ("ping_interval", "ping_timeout", "max_message"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"WebSocketConfig.{name} must be > 0 or None, got {value!r}")
        for name in ("open_timeout", "close_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"WebSocketConfig.{name} must be > 0, got {value!r}")
        queue = self.max_queue
        if isinstance(queue, bool) or not isinstance(queue, int) or queue < 1:
            raise ValueError(f"WebSocketConfig.max_queue must be an integer >= 1, got {queue!r}")


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
    #: WebSocket limits and timers, for applications that accept handshakes (see
    #: :mod:`async_handler.contract`).
    websocket: WebSocketConfig = dataclasses.field(default_factory=WebSocketConfig)

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
