"""HTTP/1.1 for WSGI applications on an asyncio event loop, parsed by ``httptools`` (llhttp).

One :class:`HttpProtocol` serves one connection; a :class:`RequestCycle` serves one request on
it; a :class:`ServerState` is shared by all connections of a worker.  The whole request body is
received (spooled to memory or a temporary file) before the application is called, so an
application never waits on a slow client while holding a thread.

Applications that honour :mod:`async_handler.contract` are called on the loop and awaited in a
task per request; every other WSGI application is called, and its body iterated, on one leased
thread of the :class:`~async_handler.threads.ThreadPool` per request.

The connection: transport, flow control, keep-alive, pipelining, the header/body/idle timers,
shutdown and abort.  The parsing half (:mod:`.request`), running the application
(:mod:`.dispatch`) and sending bodies (:mod:`.sending`) are mixed in; the response is written
by :mod:`.response`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import httptools

from ..contract import AWAITABLE_ATTR
from .config import Environ
from .dispatch import Dispatcher
from .fields import Refusal
from .flow import FlowControl
from .request import _CONTINUE, RequestHead, _StopParsing
from .response import RequestCycle, _Refused
from .sending import BodySender
from .websocket import WebSocket

if TYPE_CHECKING:
    from .server import ServerState

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


class HttpProtocol(RequestHead, Dispatcher, BodySender, asyncio.Protocol):
    """One HTTP/1.1 connection: parses requests, runs them in order, writes the responses.

    Keep-alive and pipelining are supported; responses leave in request order, and reading
    pauses while a second request waits, so a client cannot make the server parse ahead without
    bound.  Any request the server refuses itself (malformed, over a limit) is answered with a
    specific reason and ``Connection: close``; nothing behind it is processed.  Protocol
    callbacks never raise.
    """

    # Thousands at once when WebSockets idle: a __dict__ for these 40 attributes is 1.6 KB.
    # fmt: off
    __slots__ = (
        "_after_upgrade", "_async_app", "_backlog", "_base_environ", "_body_bytes",
        "_close_started", "_cycles", "_eof", "_fields", "_head_bytes", "_header_timer",
        "_headers", "_idle_timer", "_in_head", "_last_rx", "_line_parts", "_parse_stopped",
        "_piece", "_receiving", "_refusal", "_requests_seen", "_scheme", "_shutting_down",
        "_trusted", "_unix", "_upgrade_body", "_url", "_url_size", "app", "config", "flow",
        "log", "loop", "loop_thread", "parser", "peer", "state", "transport", "websocket",
    )
    # fmt: on

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
        # A list, not a deque: it holds at most _MAX_QUEUED + 1 items, and an empty deque takes
        # 760 bytes, for the whole life of a keep-alive connection or a WebSocket.
        self._cycles: list[RequestCycle | _Refused] = []
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
        # a WebSocket handshake: what the client sent after it, until the socket opens
        self._after_upgrade: bytearray | None = None
        self._requests_seen = 0
        self._backlog = b""
        # after a 101: the WebSocket that every read goes to
        self.websocket: WebSocket | None = None
        # the parser input holding the current request line (see _check_request_line)
        self._piece: memoryview = memoryview(b"")
        self._line_parts: list[memoryview] = []

    def closes_after(self, cycle: RequestCycle) -> bool:
        """Whether the connection closes after ``cycle``'s response (nothing is read after it,
        or the server is shutting down)."""
        if self._shutting_down:
            return True
        return (
            (self._eof or self._parse_stopped)
            and bool(self._cycles)
            and (self._cycles[-1] is cycle)
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
        self._set_connection_environ(transport)
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
        if self.websocket is not None:
            self.websocket.connection_lost()
        for item in self._cycles:
            if isinstance(item, RequestCycle):
                task = item.task
                if task is not None:
                    # A request closing its body finishes that close (sending.BodySender).
                    if not task.done() and not item.closing:
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
        if self.websocket is not None:
            self.websocket.eof_received()
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
        websocket = self.websocket
        if websocket is not None:
            websocket.data_received(data)
            return
        if self._after_upgrade is not None and self._parse_stopped:
            self._after_upgrade += data  # frames sent before the 101, for the socket
            return
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
            if self._after_upgrade is not None and self._parse_stopped:
                self._after_upgrade += view
                return
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
            elif self._after_upgrade is not None:
                self._after_upgrade += data[exc.args[0] :]
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

    # -- request scheduling

    def _start(self, cycle: RequestCycle) -> None:
        cycle.started = time.perf_counter()
        self.state.total_requests += 1
        cycle.task = self.loop.create_task(self._serve(cycle))
        self.state._add_request(cycle.task)

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
            del self._cycles[0]
        cycle.close_input()
        if self.flow.lost:
            return
        if not cycle.keep_alive or not cycle.finished or self._shutting_down:
            self._close()
            return
        self._next()

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
        if self.websocket is not None:
            self.websocket.shutdown(self.state.websocket_code)
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

    def _peer_text(self) -> str:
        peer = self.peer
        if isinstance(peer, tuple):
            return f"{peer[0]}:{peer[1]}"
        return str(peer or "unix socket")
