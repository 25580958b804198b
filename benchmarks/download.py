#!/usr/bin/env python3
"""Large-block download client for the 100 MB ``FileResponse`` scenario (``run.py``'s ``file``).

wrk reads with small buffers on one thread, so at several GB/s it is wrk, not the server, that
runs out of core.  This client keeps ``--connections`` keep-alive connections busy, one thread
each, reading the body with ``recv_into`` on a 1 MiB buffer (the copy into the buffer is all the
work per block, and ``recv_into`` releases the GIL while the kernel does it).  It pins itself to
``--core`` like wrk is pinned, runs for ``--duration`` seconds, and prints one JSON line with the
same fields as ``benchmarks/wrk/report.lua``'s, so ``run.py`` reads both the same way.

Standard library only, so it runs under any interpreter that runs ``run.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

BUFFER_BYTES = 1024 * 1024


class ProtocolError(Exception):
    """A response this client cannot frame (no Content-Length, oversized head, extra bytes)."""


@dataclass
class Stats:
    """One connection thread's counts; merged after the threads end, so no lock is needed."""

    requests: int = 0
    bytes: int = 0
    connect_errors: int = 0
    read_errors: int = 0
    write_errors: int = 0
    status_errors: int = 0
    timeouts: int = 0
    latencies_us: list[float] = field(default_factory=list)


def read_response(
    sock: socket.socket, buf: bytearray, view: memoryview, deadline: float, stats: Stats
) -> tuple[int, bool] | None:
    """Read one response; return (status, keep-alive), or None when the deadline cut it off."""
    filled = 0
    while True:
        n = sock.recv_into(view[filled:])
        if n == 0:
            raise ConnectionError("server closed the connection before the response head ended")
        stats.bytes += n
        filled += n
        end = buf.find(b"\r\n\r\n", 0, filled)
        if end >= 0:
            break
        if filled == len(buf):
            raise ProtocolError("response head larger than the buffer")
    head = bytes(buf[:end]).split(b"\r\n")
    status = int(head[0].split()[1])
    length: int | None = None
    keep_alive = head[0].startswith(b"HTTP/1.1")
    for line in head[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            keep_alive = value.strip().lower() != b"close"
    if length is None:
        # Every server under test sends FileResponse with its Content-Length; framing chunked
        # bodies here would only cost the client time.
        raise ProtocolError("response without Content-Length")
    remaining = length - (filled - end - 4)
    if remaining < 0:
        raise ProtocolError("more bytes than Content-Length (nothing was pipelined)")
    while remaining:
        # Checked once per block: a 100 MB body takes longer than the tail of a short run.
        if time.monotonic() >= deadline:
            return None
        n = sock.recv_into(view, min(remaining, len(buf)))
        if n == 0:
            raise ConnectionError("server closed the connection inside the body")
        stats.bytes += n
        remaining -= n
    return status, keep_alive


def connection_loop(
    host: str, port: int, path: str, deadline: float, timeout: float, stats: Stats
) -> None:
    buf = bytearray(BUFFER_BYTES)
    view = memoryview(buf)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    sock: socket.socket | None = None
    try:
        while time.monotonic() < deadline:
            if sock is None:
                try:
                    sock = socket.create_connection((host, port), timeout=timeout)
                except OSError:
                    stats.connect_errors += 1
                    time.sleep(0.01)  # Not a busy loop against a server that is gone.
                    continue
            started = time.perf_counter()
            try:
                sock.sendall(request)
            except OSError:
                stats.write_errors += 1
                sock.close()
                sock = None
                continue
            try:
                done = read_response(sock, buf, view, deadline, stats)
            except TimeoutError:
                stats.timeouts += 1
                sock.close()
                sock = None
                continue
            except (OSError, ProtocolError, ValueError, IndexError):
                stats.read_errors += 1
                sock.close()
                sock = None
                continue
            if done is None:
                break  # The deadline fell inside a body; its bytes so far still count.
            status, keep_alive = done
            stats.latencies_us.append((time.perf_counter() - started) * 1e6)
            stats.requests += 1
            if status >= 400:
                stats.status_errors += 1
            if not keep_alive:
                sock.close()
                sock = None
    finally:
        if sock is not None:
            sock.close()


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, round(p / 100 * (len(sorted_values) - 1)))
    return sorted_values[index]


def run(
    host: str, port: int, path: str, connections: int, duration: float, timeout: float
) -> dict[str, int | float]:
    """Drive the server for ``duration`` seconds; the result has report.lua's fields."""
    all_stats = [Stats() for _ in range(connections)]
    start = time.monotonic()
    deadline = start + duration
    threads = [
        threading.Thread(
            target=connection_loop, args=(host, port, path, deadline, timeout, s), daemon=True
        )
        for s in all_stats
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    latencies = sorted(x for s in all_stats for x in s.latencies_us)

    def total(name: str) -> int:
        return sum(getattr(s, name) for s in all_stats)

    return {
        "duration_us": int(elapsed * 1e6),
        "requests": total("requests"),
        "bytes": total("bytes"),
        "connect_errors": total("connect_errors"),
        "read_errors": total("read_errors"),
        "write_errors": total("write_errors"),
        "status_errors": total("status_errors"),
        "timeouts": total("timeouts"),
        "p50_us": int(percentile(latencies, 50)),
        "p90_us": int(percentile(latencies, 90)),
        "p99_us": int(percentile(latencies, 99)),
        "max_us": int(latencies[-1]) if latencies else 0,
        "mean_us": round(statistics.fmean(latencies), 1) if latencies else 0.0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/file/")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--timeout", type=float, default=60.0, help="socket timeout, seconds")
    parser.add_argument("--core", type=int, help="pin the client (all its threads) to this core")
    args = parser.parse_args(argv)
    if args.core is not None:
        # Before the threads start, so they inherit it: the client stays off the server's core.
        os.sched_setaffinity(0, {args.core})
    result = run(args.host, args.port, args.path, args.connections, args.duration, args.timeout)
    gbps = result["bytes"] / (result["duration_us"] / 1e6) / 1e9 if result["duration_us"] else 0
    print(
        f"{result['requests']} responses, {result['bytes'] / 1e9:.2f} GB in "
        f"{result['duration_us'] / 1e6:.2f} s = {gbps:.2f} GB/s over {args.connections} "
        "connections"
    )
    print("DOWNLOAD_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
