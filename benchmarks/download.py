#!/usr/bin/env python3
"""Large-block download client for the 100 MB ``FileResponse`` scenario (``run.py``'s ``file``).

wrk reads with small buffers on one thread, so at several GB/s it is wrk, not the server, that
runs out of core.  This client keeps ``--connections`` keep-alive connections busy, one thread
each, and makes the body cost the client next to nothing, so that the figure is the server's:

* The response head is read normally (``recv_into`` a 64 KiB buffer) and checked: an HTTP/1.x
  status line with status 200, a ``Content-Length`` (no ``Transfer-Encoding``).  The body bytes
  that came with the head count towards it.
* The rest of the body is received with ``MSG_TRUNC | MSG_WAITALL`` (Linux, ``man 7 tcp``): the
  kernel discards TCP data without copying it to user space, and waits in the kernel for the
  whole block (16 MiB, never more than the body has left, so the next response is never
  touched).  A 100 MB body takes 7 ``recv`` calls.  The sockets are blocking, with
  ``SO_RCVTIMEO`` for ``--timeout``: a Python socket timeout would make the descriptor
  non-blocking, so every ``recv`` would return what had arrived (about 75 KB) after a ``poll``.
* Exactly ``Content-Length`` bytes are counted per response.  A connection closed in a head or
  inside a body (a short body), bytes past the body (a long body: the next head does not parse,
  or they are waiting when the run ends), another status, a missing or malformed head, or a
  socket timeout stops the run: the client prints the reason and exits 1 (``run.py`` then
  reports the measurement as failed).  The bytes are counted, not compared: the servers send
  the same file, and checking them would bring back the copy this client exists to avoid.

Measured against our worker on the 2-core benchmark machine (4 connections, 4 s runs, client on
core 1, server on core 0, one server process, the variants interleaved; CPU from ``/proc``: the
client process's user + system time, and each core's busy share including softirq):

======================================  ======  ==========  ===========  ===========
body read                               GB/s    client CPU  core 1 busy  core 0 busy
======================================  ======  ==========  ===========  ===========
``recv_into`` 1 MiB, Python timeout     4.1     92%         96%          96%
(the previous client)
``MSG_TRUNC``, Python timeout           5.5     65%         70%          98%
``MSG_TRUNC | MSG_WAITALL``, blocking   5.3     36%         41%          96%
(this client: 7 calls per response)
======================================  ======  ==========  ===========  ===========

With the previous client both cores were saturated, so the figure was the client's as much as
the server's (gthread alike: 2.9 GB/s, client 72%, against 3.5 GB/s and 38% with this client).
Now the server's core is the limit, and 93% of it is kernel time (``perf record``: ``sendfile``,
loopback TCP, waking the client), with 1 to 1.5 ``sendfile`` calls per 100 MB response for ours
and gthread alike.  Rejected: ``MSG_TRUNC`` on a Python-timeout socket (a ``poll`` and a
``recv`` per 60 KB, 360,000 calls in 4 s); ``os.splice`` into a 1 MiB pipe and on to
``/dev/null`` (5.4 GB/s but two syscalls per 64 KiB: 77% of the client's core);
``SO_RCVLOWAT`` 256 KiB (the transfer stalled, 0.03 GB/s); 8 connections (5.0 GB/s, no
faster); a 4 MiB copy buffer (3.8 GB/s: the copy, not the call count, is the cost).
``--copy`` keeps a copying read (``recv_into`` 1 MiB), for comparison or where ``MSG_TRUNC``
does not discard TCP data (not Linux).

It pins itself to ``--core`` like wrk is pinned, runs for ``--duration`` seconds (a body cut off
by the end of the run counts as far as it got, as in wrk), and prints one JSON line with the same
fields as ``benchmarks/wrk/report.lua``'s, so ``run.py`` reads both the same way, plus
``client_cpu_share`` (the client's CPU time over the run's wall time: near 1.0 would mean the
client, not the server, was measured).  Standard library only, so it runs under any interpreter
that runs ``run.py``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

HEAD_BYTES = 64 * 1024
#: Bytes per body ``recv``: large, so a 100 MB body costs a few calls; the deadline is checked
#: between blocks, so it is also how far past ``--duration`` one connection may read.
BLOCK_BYTES = 16 * 1024 * 1024
COPY_BLOCK_BYTES = 1024 * 1024
DISCARD = socket.MSG_TRUNC | socket.MSG_WAITALL


class DownloadError(Exception):
    """A response this client will not count: wrong status, bad framing, a cut connection."""


@dataclass
class Stats:
    """One connection thread's counts; merged after the threads end, so no lock is needed."""

    requests: int = 0
    bytes: int = 0
    latencies_us: list[float] = field(default_factory=list)


class Reader:
    """One connection's buffers: the head's, and the body's sink.

    ``recv_into`` wants a buffer as large as the bytes asked for, though with ``MSG_TRUNC`` the
    kernel never writes it; an anonymous ``mmap`` is never touched, so it costs no memory (a
    ``bytearray`` is zero-filled: 16 MiB of RSS per connection).
    """

    def __init__(self, copy: bool) -> None:
        self.copy = copy
        self.head = bytearray(HEAD_BYTES)
        self.sink: bytearray | mmap.mmap = (
            bytearray(COPY_BLOCK_BYTES) if copy else mmap.mmap(-1, BLOCK_BYTES)
        )

    def close(self) -> None:
        if isinstance(self.sink, mmap.mmap):
            self.sink.close()


def parse_head(head: bytes) -> tuple[int, bool]:
    """Return (Content-Length, keep-alive) of a 200 response head (without its blank line);
    raise :class:`DownloadError` for anything else."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise DownloadError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    if parts[1] != b"200":
        raise DownloadError(f"status {parts[1].decode(errors='replace')}, not 200")
    length: int | None = None
    keep_alive = parts[0] == b"HTTP/1.1"
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise DownloadError(f"malformed header line: {line[:80]!r}")
        name = name.strip().lower()
        if name == b"content-length":
            if length is not None or not value.strip().isdigit():
                raise DownloadError(f"bad Content-Length: {value.strip()[:40]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            # Every server under test sends FileResponse with its Content-Length.
            raise DownloadError("Transfer-Encoding instead of Content-Length")
        elif name == b"connection":
            keep_alive = value.strip().lower() != b"close"
    if length is None:
        raise DownloadError("response without Content-Length")
    return length, keep_alive


def read_response(
    sock: socket.socket, reader: Reader, deadline: float, stop: threading.Event, stats: Stats
) -> bool | None:
    """Read one response, counting its bytes; return keep-alive, or None when the run ended
    inside the body (the deadline, or another connection failed)."""
    buf, view = reader.head, memoryview(reader.head)
    filled = 0
    while True:
        n = sock.recv_into(view[filled:])
        if n == 0:
            raise DownloadError(
                "connection closed before the response head"
                if filled == 0
                else "connection closed inside the response head"
            )
        filled += n
        end = buf.find(b"\r\n\r\n", max(0, filled - n - 3), filled)
        if end >= 0:
            break
        if filled == len(buf):
            raise DownloadError(f"response head larger than {len(buf)} bytes")
    length, keep_alive = parse_head(bytes(buf[:end]))
    got = filled - end - 4
    if got > length:
        raise DownloadError(f"{got - length} bytes past the {length}-byte body")
    stats.bytes += end + 4 + got
    remaining = length - got
    sink = reader.sink
    flags = 0 if reader.copy else DISCARD
    while remaining:
        if time.monotonic() >= deadline or stop.is_set():
            return None
        n = sock.recv_into(sink, min(remaining, len(sink)), flags)
        if n == 0:
            raise DownloadError(
                f"connection closed inside the body, {length - remaining} of {length} bytes"
            )
        stats.bytes += n
        remaining -= n
    return keep_alive


def connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    # Blocking from here on, so that MSG_WAITALL waits in the kernel; the kernel's own timeouts
    # keep --timeout (a timed-out recv raises BlockingIOError, EAGAIN).
    sock.settimeout(None)
    whole = int(timeout)
    tv = struct.pack("ll", whole, int((timeout - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    return sock


def check_idle(sock: socket.socket) -> None:
    """Raise if bytes past the last body are waiting at the end of the run."""
    try:
        extra = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return
    if extra:
        raise DownloadError("bytes past the end of the last body")


def connection_loop(
    host: str,
    port: int,
    path: str,
    deadline: float,
    timeout: float,
    copy: bool,
    stop: threading.Event,
    stats: Stats,
) -> None:
    """Request ``path`` over one keep-alive connection until the deadline; raise on an error."""
    reader = Reader(copy)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    sock: socket.socket | None = None
    try:
        while time.monotonic() < deadline and not stop.is_set():
            if sock is None:
                sock = connect(host, port, timeout)
            started = time.perf_counter()
            sock.sendall(request)
            try:
                keep_alive = read_response(sock, reader, deadline, stop, stats)
            except BlockingIOError:
                raise DownloadError(f"no data for {timeout} s (SO_RCVTIMEO)") from None
            if keep_alive is None:
                return  # The run ended inside a body; its bytes so far still count.
            stats.latencies_us.append((time.perf_counter() - started) * 1e6)
            stats.requests += 1
            if not keep_alive:
                sock.close()
                sock = None
        if sock is not None:
            check_idle(sock)
    finally:
        if sock is not None:
            sock.close()
        reader.close()


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, round(p / 100 * (len(sorted_values) - 1)))
    return sorted_values[index]


def run(
    host: str,
    port: int,
    path: str,
    connections: int,
    duration: float,
    timeout: float,
    copy: bool = False,
) -> dict[str, int | float]:
    """Drive the server for ``duration`` seconds; the result has report.lua's fields (its error
    counts are always 0) plus ``client_cpu_share``.

    Raises :class:`DownloadError` (or the ``OSError``) of the first connection that failed; the
    others stop at their next block.
    """
    all_stats = [Stats() for _ in range(connections)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def guarded(stats: Stats) -> None:
        try:
            connection_loop(host, port, path, deadline, timeout, copy, stop, stats)
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)
            stop.set()

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    deadline = start + duration
    threads = [threading.Thread(target=guarded, args=(s,), daemon=True) for s in all_stats]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    if errors:
        raise errors[0]
    latencies = sorted(x for s in all_stats for x in s.latencies_us)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "duration_us": int(elapsed * 1e6),
        "requests": sum(s.requests for s in all_stats),
        "bytes": sum(s.bytes for s in all_stats),
        "connect_errors": 0,
        "read_errors": 0,
        "write_errors": 0,
        "status_errors": 0,
        "timeouts": 0,
        "p50_us": int(percentile(latencies, 50)),
        "p90_us": int(percentile(latencies, 90)),
        "p99_us": int(percentile(latencies, 99)),
        "max_us": int(latencies[-1]) if latencies else 0,
        "mean_us": round(statistics.fmean(latencies), 1) if latencies else 0.0,
        "client_cpu_share": round(cpu / elapsed, 3),
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
    parser.add_argument(
        "--copy", action="store_true", help="copy bodies into a 1 MiB buffer (no MSG_TRUNC)"
    )
    args = parser.parse_args(argv)
    if args.core is not None:
        # Before the threads start, so they inherit it: the client stays off the server's core.
        os.sched_setaffinity(0, {args.core})
    try:
        result = run(
            args.host,
            args.port,
            args.path,
            args.connections,
            args.duration,
            args.timeout,
            args.copy,
        )
    except (DownloadError, OSError) as exc:
        print(f"download.py: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    gbps = result["bytes"] / (result["duration_us"] / 1e6) / 1e9 if result["duration_us"] else 0
    print(
        f"{result['requests']} responses, {result['bytes'] / 1e9:.2f} GB in "
        f"{result['duration_us'] / 1e6:.2f} s = {gbps:.2f} GB/s over {args.connections} "
        f"connections; the client used {result['client_cpu_share']:.0%} of its core"
    )
    print("DOWNLOAD_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
