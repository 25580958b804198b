#!/usr/bin/env python3
"""Load client of ``benchmarks/websocket.py``: many WebSockets from one process, on one core.

Why not the ``websockets`` asyncio client: a task, a future and a frame-parser generator per
message cost more CPU than the simplest servers spend answering it, so that client would measure
itself.  This one drives every socket from ``asyncio.Protocol`` callbacks (uvloop when installed),
with no task per socket or message: a received frame is parsed in place and the next message is
written from the same callback.  It speaks the client side of RFC 6455 for what the scenarios
need: the opening handshake (with the ``Sec-WebSocket-Accept`` check), masked text frames,
unmasked server frames of any length, fragmented messages, pong for ping, and the close frame.
It offers no extension, so no server compresses.

It pins itself to ``--core`` and prints ``MEASURE_START`` and ``MEASURE_END`` lines around the
measured part (``websocket.py`` reads the server's CPU time between them, so handshakes and
warm-up are left out), then one ``WSCLIENT_JSON`` line with the figures.  Standard library only
(uvloop optional).

* ``echo``: ``--connections`` sockets each send a ``--size``-byte text message, wait for its
  echo (checked byte for byte), and send the next, for ``--warmup`` then ``--duration`` seconds.
* ``fanout``: ``--receivers`` sockets join the group (each waits for its ``joined``), then one
  more socket sends ``--broadcasts`` messages, each once every receiver got the previous one (or
  ``--timeout`` passed) and ``--gap-ms`` later; every delivery's latency is taken from the
  send time the message carries, and every receiver's copies of every message are counted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
CONNECT_BATCH = 50
JOINED = b"joined"
ns = time.perf_counter_ns


def mask(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``key`` (RFC 6455 section 5.3), as one big-int XOR."""
    n = len(payload)
    if n == 0:
        return b""
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame (a fresh random key per frame, section 5.3)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    return head + key + mask(payload, key)


class Conn(asyncio.Protocol):
    """One client WebSocket; ``on_message(payload)`` gets every whole data message."""

    def __init__(self, host: str, port: int, path: str, errors: list[str]) -> None:
        self.key = base64.b64encode(os.urandom(16))
        self.request = (
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            ).encode()
            + b"Sec-WebSocket-Key: "
            + self.key
            + b"\r\n\r\n"
        )
        self.transport: asyncio.Transport | None = None
        self.open: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buf = bytearray()
        self.parts: list[bytes] = []
        self.handshaken = False
        self.closed = False
        self.close_code: int | None = None
        self.errors = errors

    def on_message(self, payload: bytes) -> None:
        raise NotImplementedError

    def send_text(self, payload: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(client_frame(OP_TEXT, payload))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.write(client_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.errors.append(f"connection lost (close code {self.close_code}, {exc!r})")
        if not self.open.done():
            self.open.set_exception(ConnectionError("connection lost during the handshake"))

    def data_received(self, data: bytes) -> None:
        if not self.handshaken:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self._check_handshake(bytes(self.buf[:end]))
            data = bytes(self.buf[end + 4 :])
            self.buf.clear()
            if not data or self.closed:
                return
        # Fast path: exactly one small final text frame, the usual packet here.
        if not self.buf and len(data) >= 2 and data[0] == 0x81 and data[1] == len(data) - 2 < 126:
            self.on_message(data[2:])
            return
        self.buf += data
        self._parse()

    def _check_handshake(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        accept = base64.b64encode(hashlib.sha1(self.key + GUID).digest())
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        if not lines[0].startswith(b"HTTP/1.1 101") or fields.get(b"sec-websocket-accept") != (
            accept
        ):
            error = f"handshake refused: {lines[0].decode(errors='replace')}"
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            if not self.open.done():
                self.open.set_exception(ConnectionError(error))
            return
        self.handshaken = True
        if not self.open.done():
            self.open.set_result(None)

    def _parse(self) -> None:
        buf = self.buf
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            if b1 & 0x80:
                self._fail("the server masked a frame (RFC 6455 section 5.1)")
                return
            n = b1 & 0x7F
            start = pos + 2
            if n == 126:
                if size - start < 2:
                    break
                n = int.from_bytes(buf[start : start + 2], "big")
                start += 2
            elif n == 127:
                if size - start < 8:
                    break
                n = int.from_bytes(buf[start : start + 8], "big")
                start += 8
            if size - start < n:
                break
            payload = bytes(buf[start : start + n])
            pos = start + n
            self._frame(b0 & 0x0F, bool(b0 & 0x80), payload)
            if self.closed:
                return
        del buf[:pos]

    def _frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode in (OP_TEXT, OP_BINARY, OP_CONT):
            if not fin:
                self.parts.append(payload)
                return
            if self.parts:
                self.parts.append(payload)
                payload = b"".join(self.parts)
                self.parts = []
            self.on_message(payload)
        elif opcode == OP_PING:
            if self.transport is not None:
                self.transport.write(client_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.errors.append(f"server closed the socket with {self.close_code}")
            self.close()

    def _fail(self, reason: str) -> None:
        self.errors.append(reason)
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


async def connect_all(
    factory: Callable[[int], Conn], count: int, host: str, port: int, timeout: float
) -> list[Conn]:
    """Open ``count`` sockets, ``CONNECT_BATCH`` handshakes at a time (the listen backlogs of the
    servers differ: Twisted's default is 50), and wait for every 101."""
    loop = asyncio.get_running_loop()
    conns: list[Conn] = []
    for first in range(0, count, CONNECT_BATCH):
        batch = range(first, min(count, first + CONNECT_BATCH))
        made = await asyncio.gather(
            *(loop.create_connection(functools.partial(factory, i), host, port) for i in batch)
        )
        opened = [protocol for _, protocol in made]
        await asyncio.wait_for(asyncio.gather(*(c.open for c in opened)), timeout)
        conns += opened
    return conns


def percentile(sorted_values: Sequence[int], q: float) -> float:
    """Nearest-rank percentile, in the values' unit; 0 for none."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[rank])


def latency_fields(latencies_ns: list[int]) -> dict[str, float]:
    latencies_ns.sort()
    return {
        "p50_us": percentile(latencies_ns, 50) / 1000,
        "p99_us": percentile(latencies_ns, 99) / 1000,
        "max_us": (latencies_ns[-1] / 1000) if latencies_ns else 0.0,
    }


def mark(line: str) -> None:
    print(line, flush=True)


async def run_echo(args: argparse.Namespace) -> dict[str, Any]:
    errors: list[str] = []
    latencies: list[int] = []
    state = {"record": False, "send": True, "count": 0, "mismatch": 0}
    filler = b"." * max(0, args.size - 17)

    class Echo(Conn):
        def __init__(self, index: int) -> None:
            super().__init__(args.host, args.port, "/ws/echo/", errors)
            self.index = index
            self.seq = 0
            self.expected = b""
            self.sent_at = 0

        def next(self) -> None:
            self.seq += 1
            self.expected = b"%05d %010d %s" % (self.index, self.seq, filler)
            self.sent_at = ns()
            self.send_text(self.expected)

        def on_message(self, payload: bytes) -> None:
            now = ns()
            if payload != self.expected:
                state["mismatch"] += 1
            if state["record"]:
                latencies.append(now - self.sent_at)
                state["count"] += 1
            if state["send"]:
                self.next()

    conns = await connect_all(Echo, args.connections, args.host, args.port, args.timeout)
    for conn in conns:
        conn.next()  # type: ignore[attr-defined]
    await asyncio.sleep(args.warmup)
    mark("MEASURE_START")
    cpu0, t0 = time.process_time(), time.monotonic()
    state["record"] = True
    await asyncio.sleep(args.duration)
    state["record"] = False
    elapsed = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    mark("MEASURE_END")
    state["send"] = False
    await asyncio.sleep(0.2)
    for conn in conns:
        conn.close()
    return {
        "scenario": "echo",
        "connections": args.connections,
        "size": args.size,
        "messages": state["count"],
        "duration_s": elapsed,
        "msgs_per_s": state["count"] / elapsed,
        "mismatches": state["mismatch"],
        "client_cpu_share": cpu / elapsed,
        "errors": errors[:20],
        "error_count": len(errors),
        **latency_fields(latencies),
    }


async def run_fanout(args: argparse.Namespace) -> dict[str, Any]:
    errors: list[str] = []
    receivers, total = args.receivers, args.warmup_broadcasts + args.broadcasts
    counts = [bytearray(total) for _ in range(receivers)]
    remaining = [receivers] * total
    complete_ns = [0] * total
    latencies: list[int] = []
    stray: list[bytes] = []
    loop = asyncio.get_running_loop()
    done: dict[int, asyncio.Future[None]] = {}
    warmup = args.warmup_broadcasts

    class Receiver(Conn):
        def __init__(self, index: int) -> None:
            super().__init__(args.host, args.port, "/ws/fanout/", errors)
            self.counts = counts[index]
            self.joined: asyncio.Future[None] = loop.create_future()

        def on_message(self, payload: bytes) -> None:
            now = ns()
            if payload == JOINED:
                if not self.joined.done():
                    self.joined.set_result(None)
                return
            try:
                seq_text, sent_text = payload.split(b" ")
                seq, sent = int(seq_text), int(sent_text)
                self.counts[seq] = min(255, self.counts[seq] + 1)
            except (ValueError, IndexError):
                stray.append(payload[:64])
                return
            if self.counts[seq] > 1:
                return
            if seq >= warmup:
                latencies.append(now - sent)
            remaining[seq] -= 1
            if remaining[seq] == 0:
                complete_ns[seq] = now - sent
                waiter = done.get(seq)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    class Sender(Conn):
        def on_message(self, payload: bytes) -> None:
            stray.append(payload[:64])

    conns = await connect_all(Receiver, receivers, args.host, args.port, args.timeout)
    await asyncio.wait_for(
        asyncio.gather(*(c.joined for c in conns)),  # type: ignore[attr-defined]
        args.timeout,
    )
    sender = Sender(args.host, args.port, "/ws/fanout/send/", errors)
    await loop.create_connection(lambda: sender, args.host, args.port)
    await asyncio.wait_for(sender.open, args.timeout)
    timeouts = 0
    cpu0 = t0 = 0.0
    for seq in range(total):
        if seq == warmup:
            mark("MEASURE_START")
            cpu0, t0 = time.process_time(), time.monotonic()
        waiter = done[seq] = loop.create_future()
        sender.send_text(b"%d %d" % (seq, ns()))
        try:
            await asyncio.wait_for(waiter, args.timeout)
        except TimeoutError:
            timeouts += 1
        await asyncio.sleep(args.gap_ms / 1000)
    elapsed = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    mark("MEASURE_END")
    # Late copies still count as delivered (and as duplicates when repeated).
    await asyncio.sleep(1.0)
    for conn in [*conns, sender]:
        conn.close()
    missing = sum(row.count(0) for row in counts)
    duplicates = sum(c - 1 for row in counts for c in row if c > 1)
    complete = sorted(c for c in complete_ns[warmup:] if c)
    return {
        "scenario": "fanout",
        "receivers": receivers,
        "broadcasts": args.broadcasts,
        "warmup_broadcasts": warmup,
        "deliveries": len(latencies),
        "expected_deliveries": receivers * total,
        "missing": missing,
        "duplicates": duplicates,
        "stray_messages": len(stray),
        "broadcast_timeouts": timeouts,
        "duration_s": elapsed,
        "client_cpu_share": cpu / elapsed if elapsed else 0.0,
        "errors": errors[:20],
        "error_count": len(errors),
        "all_delivered_p50_us": percentile(complete, 50) / 1000,
        "all_delivered_p99_us": percentile(complete, 99) / 1000,
        **latency_fields(latencies),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--core", type=int, help="pin this process to one core")
    parser.add_argument("--timeout", type=float, default=30.0, help="handshakes; each broadcast")
    sub = parser.add_subparsers(dest="scenario", required=True)
    echo = sub.add_parser("echo")
    echo.add_argument("--connections", type=int, default=100)
    echo.add_argument("--duration", type=float, default=10.0)
    echo.add_argument("--warmup", type=float, default=1.0)
    echo.add_argument("--size", type=int, default=32)
    fanout = sub.add_parser("fanout")
    fanout.add_argument("--receivers", type=int, default=1000)
    fanout.add_argument("--broadcasts", type=int, default=100)
    fanout.add_argument("--warmup-broadcasts", type=int, default=5)
    fanout.add_argument("--gap-ms", type=float, default=20.0)
    args = parser.parse_args(argv)
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runner = run_echo if args.scenario == "echo" else run_fanout
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(runner(args))
        result["client_loop"] = "asyncio"
    else:
        result = uvloop.run(runner(args))
        result["client_loop"] = "uvloop"
    print("WSCLIENT_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
