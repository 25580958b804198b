"""WebSockets (RFC 6455) on an upgraded HTTP/1.1 connection: the handshake check and the socket.

Framing, masking, control frames, close codes, the message-size limit and permessage-deflate
(RFC 7692) are the ``websockets`` library's sans-IO :class:`~websockets.server.ServerProtocol`;
this module is the I/O around it: it feeds the protocol what the transport reads, writes what
the protocol wants sent, assembles messages (UTF-8 checked as fragments arrive, so invalid text
fails fast with 1007), and runs the timers (pings, the close timeout).

:func:`open_handshake` runs when a request head asks for ``Upgrade: websocket``.  It refuses a
malformed handshake (bad key, bad version, a body...) with the status ``websockets`` chooses, so
such a request never reaches the application; a valid one yields a :class:`WebSocket`, which
the application finds in the environ (:data:`async_handler.contract.WEBSOCKET_KEY`).  If the
application answers 101, the connection calls :meth:`WebSocket.start` and from then on hands
it every read; otherwise the answer goes out as plain HTTP and the connection closes.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
from collections import deque
from collections.abc import Sequence
from typing import Any

from websockets.exceptions import InvalidHeader
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.headers import parse_subprotocol
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from ..contract import WebSocketDisconnect
from .config import Logger, WebSocketConfig
from .fields import Refusal
from .flow import FlowControl

__all__ = ["WebSocket", "is_handshake", "open_handshake"]

# What the server sets on a 101 itself; the application's values for these are dropped (a 101
# has no content, RFC 9110 section 15.2).
_SERVER_FIELDS = frozenset(
    {
        "connection",
        "content-length",
        "content-type",
        "date",
        "keep-alive",
        "sec-websocket-accept",
        "sec-websocket-extensions",
        "transfer-encoding",
        "upgrade",
    }
)

# websockets logs every open and close at INFO: per socket, that is noise in a server log.
_protocol_log = logging.getLogger("async_handler.websocket.protocol")

_CLOSING = (State.CLOSING, State.CLOSED)

# websockets' recommended memory-light settings (12-bit windows, memLevel 5): about 64 KiB per
# socket instead of zlib's 320 KiB.  One factory for every socket: it only holds the settings
# (each accepted offer gets its own compressor), and ServerProtocol never mutates the sequence.
_DEFLATE = (
    ServerPerMessageDeflateFactory(
        server_max_window_bits=12,
        client_max_window_bits=12,
        compress_settings={"memLevel": 5},
    ),
)


class _ServerProtocol(ServerProtocol):
    """websockets' server protocol, except for a Close frame inside a fragmented message.

    RFC 6455 section 5.4 lets control frames arrive between the fragments of a message, and
    section 5.5.1 says an endpoint that receives a Close frame answers with one (echoing the
    code).  websockets instead fails the connection with 1002 ("incomplete fragmented
    message", raised from ``recv_frame``) when a Close arrives before the last fragment;
    Autobahn case 7.1.5 expects the close to be echoed.  The unfinished message can never be
    completed (section 1.4: data after a Close is discarded), so forgetting it is all it takes:
    clearing websockets' count of the message's received bytes makes ``recv_frame`` treat the
    Close as any other and run the normal closing handshake.
    """

    def recv_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.CLOSE:
            # The attribute is ``cur_size`` up to websockets 15, ``current_size`` since 16;
            # tests/test_websocket_autobahn.py fails if a later version renames it again.
            for name in ("current_size", "cur_size"):
                if getattr(self, name, None) is not None:
                    setattr(self, name, None)
        super().recv_frame(frame)


def is_handshake(upgrade: str | None) -> bool:
    """Whether an ``Upgrade`` field value asks for a WebSocket (RFC 6455 section 4.2.1)."""
    return upgrade is not None and "websocket" in upgrade.lower()


def open_handshake(
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    *,
    config: WebSocketConfig,
    transport: Any,
    flow: FlowControl,
    log: Logger,
    server_header: str,
) -> WebSocket:
    """Check a handshake request and return its :class:`WebSocket`, not yet open.

    Raises :class:`~async_handler.http.fields.Refusal` with the status and reason for a request
    that is not a valid handshake (405, 400, 426, ...), as ``websockets`` answers them.
    """
    protocol = _ServerProtocol(
        extensions=_DEFLATE if config.deflate else None,
        max_size=config.max_message,
        logger=_protocol_log,
    )
    # The head as received (llhttp already checked its syntax and limits), for websockets' own
    # parser: it then checks the handshake exactly as its own servers do.
    head = [b"GET ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        head += (name, b": ", value, b"\r\n")
    head.append(b"\r\n")
    protocol.receive_data(b"".join(head))
    events = protocol.events_received()
    request = events[0] if events else None
    if not isinstance(request, Request):
        raise Refusal(400, "Malformed WebSocket handshake")
    response = protocol.accept(request)
    if response.status_code != 101:
        reason = response.body.decode("utf-8", "replace").strip() or response.reason_phrase
        raise Refusal(response.status_code, reason)
    offered: list[str] = []
    try:
        for field in request.headers.get_all("Sec-WebSocket-Protocol"):
            offered += parse_subprotocol(field)
    except InvalidHeader as exc:
        raise Refusal(400, f"Invalid Sec-WebSocket-Protocol field: {exc}") from None
    # The handshake is checked and the environ has every field.  The generator websockets
    # parses with keeps the request in its frame for the life of the socket (server.py,
    # ServerProtocol.parse): empty its headers, 2 KB per socket, which nothing reads again.
    request.headers.clear()
    if server_header and "Server" not in response.headers:
        response.headers["Server"] = server_header
    return WebSocket(protocol, response, offered, config, transport, flow, log)


def _utf8_decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")("strict")


class WebSocket:
    """One WebSocket of a connection (a :class:`~async_handler.contract.WebSocketSession`).

    All methods run on the loop.  Received messages wait in a queue of at most
    ``config.max_queue`` before reading pauses; :meth:`send` waits while the transport buffer is
    above its high-water mark.
    """

    def __init__(
        self,
        protocol: ServerProtocol,
        response: Response,
        subprotocols: Sequence[str],
        config: WebSocketConfig,
        transport: Any,
        flow: FlowControl,
        log: Logger,
    ) -> None:
        # per socket
        self._protocol = protocol
        self._response: Response | None = response  # until start() sends it
        self.subprotocols: Sequence[str] = tuple(subprotocols)
        self._config = config
        self._transport = transport
        self._flow = flow
        self._log = log
        self._loop = asyncio.get_running_loop()
        self._open = False
        self._lost = False
        self._opened: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] = self._loop.create_future()
        # Created by the first message: an empty deque takes 760 bytes, and most sockets of a
        # big fan-out only ever receive pings.
        self._messages: deque[str | bytes] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_timer: asyncio.TimerHandle | None = None
        self._ping_payload = b""
        self._close_timer: asyncio.TimerHandle | None = None
        # per message, while its fragments arrive
        self._parts: list[Any] = []
        self._text = False
        self._decoder: codecs.IncrementalDecoder | None = None

    # -- the application's side (async_handler.contract.WebSocketSession)

    @property
    def close_code(self) -> int | None:
        """The close code received (``1005`` if the frame had none), ``1006`` once the connection
        ended without a closing handshake, else ``None``."""
        protocol = self._protocol
        if protocol.close_rcvd is not None:
            return protocol.close_rcvd.code
        if self._lost:
            return 1006
        return None

    def _disconnect(self) -> WebSocketDisconnect:
        protocol = self._protocol
        close = protocol.close_rcvd or protocol.close_sent
        if close is not None and not (self._lost and protocol.close_rcvd is None):
            return WebSocketDisconnect(close.code, close.reason)
        return WebSocketDisconnect(1006, "connection lost")

    async def opened(self) -> None:
        """Return once the 101 is sent; :class:`WebSocketDisconnect` (1006) if the connection
        ended first (it always ends after a handshake answered in plain HTTP)."""
        if self._open:
            return
        if self._lost:
            raise WebSocketDisconnect(1006, "connection lost before the handshake completed")
        if self._opened is None:
            self._opened = self._loop.create_future()
        await asyncio.shield(self._opened)
        if not self._open:
            raise WebSocketDisconnect(1006, "connection lost before the handshake completed")

    async def receive(self) -> str | bytes:
        """The next whole message; :class:`WebSocketDisconnect` once none can follow."""
        while True:
            messages = self._messages
            if messages:
                message = messages.popleft()
                if self._reading_paused and len(messages) <= self._config.max_queue // 4:
                    self._reading_paused = False
                    self._flow.resume_reading()
                return message
            if self._lost or self._protocol.state in _CLOSING:
                raise self._disconnect()
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    async def send(self, data: str | bytes) -> None:
        """Send one message (``str``: text, ``bytes``: binary); wait while the peer is slow."""
        protocol = self._protocol
        if self._lost or protocol.state is not State.OPEN:
            raise self._disconnect()
        if isinstance(data, str):
            protocol.send_text(data.encode("utf-8"))
        elif isinstance(data, (bytes, bytearray, memoryview)):
            protocol.send_binary(data)
        else:
            raise TypeError(f"a WebSocket message is str or bytes, not {type(data).__name__}")
        self._flush()
        flow = self._flow
        if flow.write_paused:
            await flow.drain()
            if self._lost:
                raise self._disconnect()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame (once), then return when the closing handshake is over or the
        close timeout dropped the connection."""
        protocol = self._protocol
        if not self._lost and protocol.state is State.OPEN:
            protocol.send_close(code, reason)  # raises ProtocolError for a code RFC 6455 forbids
            self._flush()
        elif not self._open and not self._lost:
            return  # never opened: the connection closes after the HTTP answer
        await asyncio.shield(self._closed)

    # -- the connection's side

    def start(self, headers: Sequence[tuple[str, str]], early: bytes) -> None:
        """Send the 101 with the application's ``headers`` and open the socket; ``early`` is
        what the client sent after the handshake before it was answered."""
        response = self._response
        assert response is not None, "WebSocket.start() called twice"
        self._response = None  # its headers would live as long as the socket
        for name, value in headers:
            if name.lower() not in _SERVER_FIELDS:
                response.headers[name] = value
        self._protocol.send_response(response)
        self._flush()
        self._open = True
        if self._opened is not None and not self._opened.done():
            self._opened.set_result(None)
        self._flow.resume_reading()
        self._schedule_ping()
        if early:
            self.data_received(early)

    async def wait_closed(self) -> None:
        """Return once the connection is gone."""
        await asyncio.shield(self._closed)

    def data_received(self, data: bytes) -> None:
        """Feed received bytes to the protocol, queue the messages, answer control frames."""
        protocol = self._protocol
        protocol.receive_data(data)
        for frame in protocol.events_received():
            if not isinstance(frame, Frame):  # pragma: no cover - only frames once open
                continue
            opcode = frame.opcode
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY or opcode is Opcode.CONT:
                if not self._fragment(opcode, frame.data, frame.fin):
                    break
            elif opcode is Opcode.PONG:
                self._pong(frame.data)
            elif opcode is Opcode.CLOSE:
                # A message cut short by the close (see _ServerProtocol) is dropped.
                self._parts = []
                self._decoder = None
        self._flush()
        if protocol.state in _CLOSING:
            self._wake()

    def eof_received(self) -> None:
        """The client closed its side (without a close frame, if it had not sent one)."""
        self._protocol.receive_eof()
        self._flush()
        self._wake()

    def connection_lost(self) -> None:
        """The transport is gone: release every waiter, stop the timers."""
        self._lost = True
        for timer in (self._ping_timer, self._pong_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._pong_timer = self._close_timer = None
        if self._opened is not None and not self._opened.done():
            self._opened.set_result(None)
        if not self._closed.done():
            self._closed.set_result(None)
        self._wake()

    def shutdown(self, code: int = 1012) -> None:
        """Graceful server stop: close with ``code``, by default 1012 (Service Restart, RFC
        6455 section 7.4 as registered by IANA) so that clients know to reconnect; 1001
        (Going Away) when the server is stopping for good."""
        if not self._lost and self._protocol.state is State.OPEN:
            reason = "server going away" if code == 1001 else "server restarting"
            self._protocol.send_close(code, reason)
            self._flush()

    # -- internals

    def _fragment(self, opcode: Opcode, data: Any, fin: bool) -> bool:
        # RFC 6455 section 5.4: fragments of one message; websockets checked their order.
        # Text is decoded as it arrives so that invalid UTF-8 fails the socket at once
        # (section 8.1, Autobahn 6.x "fail fast").
        if opcode is not Opcode.CONT:
            self._text = opcode is Opcode.TEXT
            self._decoder = _utf8_decoder() if self._text else None
            self._parts = []
        decoder = self._decoder
        if decoder is not None:
            try:
                piece: Any = decoder.decode(data, fin)
            except UnicodeDecodeError as exc:
                self._protocol.fail(1007, f"invalid UTF-8: {exc.reason}")
                self._parts = []
                return False
        else:
            piece = data
        if not fin:
            self._parts.append(piece)
            return True
        parts, self._parts = self._parts, []
        if parts:
            parts.append(piece)
            message: str | bytes = "".join(parts) if self._text else b"".join(parts)
        else:
            message = piece if self._text else bytes(piece)
        messages = self._messages
        if messages is None:
            messages = self._messages = deque()
        messages.append(message)
        self._wake()
        if not self._reading_paused and len(messages) >= self._config.max_queue:
            self._reading_paused = True
            self._flow.pause_reading()
        return True

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _flush(self) -> None:
        transport = self._transport
        if self._lost:
            return
        for data in self._protocol.data_to_send():
            if data:
                transport.write(data)
            else:
                # websockets asks for the end of the stream: after the closing handshake the
                # server closes the TCP connection first (RFC 6455 section 7.1.1).
                transport.close()
                self._arm_close_timer()
                return
        if self._protocol.close_expected():
            self._arm_close_timer()

    def _arm_close_timer(self) -> None:
        if self._close_timer is None and not self._lost:
            self._close_timer = self._loop.call_later(
                self._config.close_timeout, self._close_timed_out
            )

    def _close_timed_out(self) -> None:
        self._close_timer = None
        if not self._lost:
            self._transport.abort()

    def _schedule_ping(self) -> None:
        interval = self._config.ping_interval
        if interval is not None and not self._lost:
            self._ping_timer = self._loop.call_later(interval, self._ping)

    def _ping(self) -> None:
        self._ping_timer = None
        if self._lost or self._protocol.state is not State.OPEN:
            return
        self._ping_payload = os.urandom(4)
        self._protocol.send_ping(self._ping_payload)
        self._flush()
        timeout = self._config.ping_timeout
        if timeout is not None:
            self._pong_timer = self._loop.call_later(timeout, self._ping_timed_out)
        else:
            self._schedule_ping()

    def _pong(self, data: Any) -> None:
        if self._ping_payload and bytes(data) == self._ping_payload:
            self._ping_payload = b""
            if self._pong_timer is not None:
                self._pong_timer.cancel()
                self._pong_timer = None
            self._schedule_ping()

    def _ping_timed_out(self) -> None:
        self._pong_timer = None
        if self._lost or self._protocol.state is not State.OPEN:
            return
        self._log.info("WebSocket ping not answered in %ss: closing", self._config.ping_timeout)
        self._protocol.fail(1011, "keepalive ping timeout")
        self._flush()
