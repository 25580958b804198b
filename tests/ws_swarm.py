"""A cheap WebSocket client for thousands of sockets in one process: websockets' sans-IO
:class:`~websockets.client.ClientProtocol` on plain asyncio protocols.

The asyncio client of ``websockets`` runs a task or two per connection; here a socket is one
protocol object and one parser, so 5,000 of them cost the test process little and the server,
not the client, is what a scale test measures.  Framing, masking, the handshake check and the
automatic pong to every ping are the library's; this module only moves bytes and counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import enable_client_permessage_deflate
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

__all__ = [
    "SwarmSocket",
    "child_pids",
    "close_swarm",
    "drain_frames",
    "open_swarm",
    "read_rss",
    "stalled_socket",
]


def _payload(frame: Frame) -> str | bytes:
    # The tests' messages are small enough to come unfragmented.
    return frame.data.decode() if frame.opcode is Opcode.TEXT else bytes(frame.data)


class SwarmSocket(asyncio.Protocol):
    """One client WebSocket.  ``opened`` resolves with the handshake response (or its error);
    ``closed`` resolves once the TCP connection is gone.  ``pings`` counts the pings received
    (each answered by the protocol itself), ``messages`` keeps text/binary payloads unless
    ``on_message`` takes them."""

    def __init__(
        self,
        uri: str,
        *,
        deflate: bool,
        on_message: Callable[[SwarmSocket, str | bytes], None] | None = None,
    ) -> None:
        self.protocol = ClientProtocol(
            parse_uri(uri),
            extensions=enable_client_permessage_deflate(None) if deflate else None,
            max_size=None,
        )
        self.on_message = on_message
        self.pings = 0
        self.messages: list[str | bytes] = []
        self.close_code: int | None = None
        self.response: Response | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[Response] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.protocol.send_request(self.protocol.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Response):
                self.response = event
                if not self.opened.done():
                    if protocol.handshake_exc is not None:
                        self.opened.set_exception(protocol.handshake_exc)
                    else:
                        self.opened.set_result(event)
            elif isinstance(event, Frame):
                if event.opcode is Opcode.PING:
                    self.pings += 1
                elif event.opcode in (Opcode.TEXT, Opcode.BINARY):
                    payload = _payload(event)
                    if self.on_message is not None:
                        self.on_message(self, payload)
                    else:
                        self.messages.append(payload)
        if protocol.close_rcvd is not None and self.close_code is None:
            self.close_code = protocol.close_rcvd.code
        self._flush()

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_code is None:
            rcvd = self.protocol.close_rcvd
            self.close_code = rcvd.code if rcvd is not None else 1006
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection lost: {exc!r}"))
        if not self.closed.done():
            self.closed.set_result(None)

    # -- the test's side

    @property
    def is_open(self) -> bool:
        """Whether the socket is open (handshake done, no close frame, connection up)."""
        return self.protocol.state is State.OPEN and not self.closed.done()

    def send(self, message: str) -> None:
        """Send a text message."""
        self.protocol.send_text(message.encode())
        self._flush()

    def close(self) -> None:
        """Start the closing handshake (1000); ``closed`` resolves when the server hangs up."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(1000)
            self._flush()
        elif self.transport is not None:
            self.transport.close()

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
            else:
                transport.write_eof() if transport.can_write_eof() else transport.close()


async def open_swarm(
    host: str,
    port: int,
    paths: Iterable[str],
    *,
    deflate: bool = False,
    concurrency: int = 100,
    on_message: Callable[[SwarmSocket, str | bytes], None] | None = None,
    timeout: float = 60.0,
) -> list[SwarmSocket]:
    """Open one socket per path on ``host:port``, at most ``concurrency`` handshakes at a time
    (so the listen backlog never overflows); raise if any handshake fails."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)

    async def one(path: str) -> SwarmSocket:
        uri = f"ws://{host}:{port}{path}"
        async with gate:
            _, sock = await loop.create_connection(
                lambda: SwarmSocket(uri, deflate=deflate, on_message=on_message), host, port
            )
            await sock.opened
        return sock

    tasks = [asyncio.ensure_future(one(path)) for path in paths]
    try:
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    except BaseException:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, SwarmSocket) and result.transport is not None:
                result.transport.abort()
        raise


async def close_swarm(sockets: Iterable[SwarmSocket], timeout: float = 20.0) -> None:
    """Close every socket (closing handshake), abort whatever is still up after ``timeout``."""
    sockets = list(sockets)
    for sock in sockets:
        sock.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(s.closed for s in sockets)), timeout)
    for sock in sockets:
        if sock.transport is not None and not sock.closed.done():
            sock.transport.abort()


def read_rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (``VmRSS`` in ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (a gunicorn master's workers)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            children += [int(p) for p in (task / "children").read_text().split()]
    return sorted(children)


def stalled_socket(
    host: str, port: int, path: str, rcvbuf: int = 4096
) -> tuple[socket.socket, str | bytes]:
    """A raw socket that reads the handshake and the server's first message, then nothing
    more: with a small receive buffer its TCP window fills after a few kilobytes, and the
    server's writes back up.  Returns the socket and that first message."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Before connect(), so that the window advertised in the handshake is already small.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect((host, port))
    protocol = ClientProtocol(parse_uri(f"ws://{host}:{port}{path}"), max_size=None)
    protocol.send_request(protocol.connect())
    for data in protocol.data_to_send():
        sock.sendall(data)
    # Read the 101 byte by byte: nothing after the head may be consumed from the socket.
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed during the handshake: {head!r}")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101 "):
        raise ConnectionError(f"handshake refused: {head!r}")
    # Then exactly one frame, byte by byte as well, so that drain_frames() starts on a frame.
    reader = ClientProtocol(parse_uri("ws://stalled/"), state=State.OPEN, max_size=None)
    while True:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed before the first message")
        reader.receive_data(chunk)
        for event in reader.events_received():
            if isinstance(event, Frame) and event.opcode in (Opcode.TEXT, Opcode.BINARY):
                return sock, _payload(event)


def drain_frames(sock: socket.socket, timeout: float) -> tuple[list[str | bytes], int | None]:
    """Read a stalled socket to the end: the messages it got and the close code received."""
    protocol = ClientProtocol(parse_uri("ws://stalled/"), state=State.OPEN, max_size=None)
    messages: list[str | bytes] = []
    sock.settimeout(timeout)
    while True:
        try:
            data = sock.recv(1 << 16)
        except (TimeoutError, OSError):
            break
        if not data:
            break
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Frame) and event.opcode in (Opcode.TEXT, Opcode.BINARY):
                messages.append(_payload(event))
        for out in protocol.data_to_send():
            if out:
                with contextlib.suppress(OSError):
                    sock.sendall(out)
        if protocol.close_rcvd is not None and protocol.state is State.CLOSED:
            break
    close = protocol.close_rcvd
    return messages, close.code if close is not None else None


def describe_pid(pid: int) -> dict[str, Any]:
    """A process's RSS and open file descriptors, for failure messages."""
    return {"pid": pid, "rss": read_rss(pid), "fds": len(os.listdir(f"/proc/{pid}/fd"))}
