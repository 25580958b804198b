"""WebSocket flow control end to end, under a real gunicorn worker (issue 13, "Protocol"):

* the open timeout: a view that neither accepts nor refuses in time is cancelled with a 503;
* the inbound queue bound: once ``max_queue`` messages wait unread, the worker stops reading,
  so a client that floods a view that is not reading is held back by TCP, and nothing is lost;
* write back-pressure: ``ws.send()`` waits while the client does not read, so a view flooding
  a slow client holds a bounded amount, and the client still gets every message in order.

Raw sockets on the client side (websockets' own framing for the frames), so that the tests see
exactly what TCP lets through.
"""

from __future__ import annotations

import hashlib
import json
import select
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from websockets.frames import Frame, Opcode

from tests.server import GunicornServer
from tests.ws_raw import handshake, text_frame

DJANGO_APP = "tests.djproject.wsgi:application"
OPEN_TIMEOUT = 1.0
MAX_QUEUE = 4
MIB = 1 << 20


@pytest.fixture(scope="module")
def worker() -> Iterator[GunicornServer]:
    with GunicornServer(
        DJANGO_APP,
        args=["--threads", "2", "--graceful-timeout", "5"],
        env={
            "ASYNC_HANDLER_WS_OPEN_TIMEOUT": str(OPEN_TIMEOUT),
            "ASYNC_HANDLER_WS_MAX_QUEUE": str(MAX_QUEUE),
        },
        ready_path="/async/hello/",
    ) as server:
        yield server


def _eventually(server: GunicornServer, line: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while line not in server.events():
        assert time.monotonic() < deadline, (line, server.events()[-20:])
        time.sleep(0.02)


class _Peer:
    """A raw client socket past its handshake, reading the server's frames."""

    def __init__(self, server: GunicornServer, path: str) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=10)
        self.sock.sendall(handshake(path))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            assert chunk, f"closed during the handshake: {data!r}"
            data += chunk
        head, _, self._buffer = data.partition(b"\r\n\r\n")
        self.head = head + b"\r\n\r\n"

    def close(self) -> None:
        self.sock.close()

    def _exact(self, size: int) -> bytes:
        parts, left = [self._buffer[:size]], size - len(self._buffer[:size])
        self._buffer = self._buffer[size:]
        while left:
            chunk = self.sock.recv(min(left, MIB))
            assert chunk, "EOF inside a frame"
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    def frame(self) -> tuple[int, bytes]:
        """One unmasked, unfragmented server frame (RFC 6455 section 5.2)."""
        first, second = self._exact(2)
        assert first & 0x80, "a fragmented frame"
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", self._exact(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", self._exact(8))
        return first & 0x0F, self._exact(size)


def test_a_view_that_neither_accepts_nor_refuses_gets_503_at_the_open_timeout(worker):
    started = time.monotonic()
    peer = _Peer(worker, "/ws/flow/slow/?accept_after=30")
    elapsed = time.monotonic() - started
    peer.close()
    head = peer.head
    assert head.startswith(b"HTTP/1.1 503 "), head
    assert OPEN_TIMEOUT * 0.9 <= elapsed < OPEN_TIMEOUT + 4, elapsed
    _eventually(worker, "cancelled slow before accept")


def test_reading_pauses_while_max_queue_messages_wait_and_nothing_is_lost(worker):
    hold = 4.0
    peer = _Peer(worker, f"/ws/flow/hold/?hold={hold}")
    sock = peer.sock
    assert peer.head.startswith(b"HTTP/1.1 101 "), peer.head
    _eventually(worker, "open hold")
    opened = time.monotonic()
    digest = hashlib.sha256()
    payloads = (bytes([i % 251]) * (512 * 1024) for i in range(10**6))
    pending, sent_bytes, messages = b"", 0, 0
    sock.setblocking(False)
    # Flood the view, which reads nothing for `hold` seconds, until TCP holds the client back.
    while True:
        if not pending:
            payload = next(payloads)
            digest.update(payload)
            messages += 1
            pending = Frame(Opcode.BINARY, payload).serialize(mask=True)
        if not select.select([], [sock], [], 0.5)[1]:
            break  # not writable for 0.5 s: the worker stopped reading
        sent = sock.send(pending)
        sent_bytes += sent
        pending = pending[sent:]
        assert sent_bytes < 48 * MIB, "the worker read on into memory: reading never paused"
    stalled_after = time.monotonic() - opened
    assert stalled_after < hold, "the view started reading before the client was held back"
    assert "reading hold" not in worker.events()
    # Once the view reads, the worker reads again: the rest goes through, and all of it arrives.
    sock.setblocking(True)
    sock.settimeout(30)
    sock.sendall(pending)
    for _ in range(MAX_QUEUE * 2):
        payload = next(payloads)
        digest.update(payload)
        messages += 1
        sock.sendall(Frame(Opcode.BINARY, payload).serialize(mask=True))
    sock.sendall(text_frame("end"))
    opcode, answer = peer.frame()
    peer.close()
    assert opcode == 0x1
    assert json.loads(answer) == {"count": messages, "sha256": digest.hexdigest()}
    print(f"client held back after {sent_bytes / MIB:.1f} MiB ({messages} messages sent in all)")


def test_send_waits_for_a_client_that_does_not_read(worker):
    count, size = 200, 256 * 1024  # 50 MiB in all
    peer = _Peer(worker, f"/ws/flow/flood/?flood={count}&size={size}")
    assert peer.head.startswith(b"HTTP/1.1 101 "), peer.head
    _eventually(worker, "open flood")
    time.sleep(2.0)  # the client reads nothing meanwhile

    def sent() -> int:
        return sum(1 for line in worker.events() if line.startswith("sent flood "))

    held = sent()
    # What TCP buffers on loopback (a few MiB each way) and the transport's high-water mark:
    # far from the 50 MiB the view would have queued if send() did not wait.
    assert held < count * 0.6, f"the view sent {held} of {count} messages to a stalled client"
    for i in range(count):
        opcode, payload = peer.frame()
        assert opcode == 0x2
        assert len(payload) == size and int.from_bytes(payload[:4], "big") == i
    _eventually(worker, "flood done flood")
    peer.close()
    print(f"send() held the view at {held} of {count} messages of {size // 1024} KiB")
