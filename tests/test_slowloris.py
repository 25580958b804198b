"""Slowloris: 1,000 connections trickle a request head at 1 byte/s while a client keeps working.

A real gunicorn runs our worker with ``ASYNC_HANDLER_HEADER_TIMEOUT=3``.  One thread opens 1,000
connections and sends one byte of a never-ending request head per second on each; the test
thread meanwhile sends ordinary requests, alternating a kept-alive connection and a new
connection per request, until every trickling connection has been dealt with.  Asserted:

* the ordinary requests all succeed and their p99 latency stays under 100 ms (p50/p99 printed);
* each trickling connection is answered ``408`` and closed by the server at the header timeout
  (measured from the client's connect: not before it, and within a bounded margin after it);
* the same worker process serves throughout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Iterator

import pytest

from tests._support import raise_nofile_limit
from tests.reliability import percentile
from tests.server import CONTRACT_APP, GunicornServer, gunicorn_server

pytestmark = [pytest.mark.server, pytest.mark.load, pytest.mark.timeout(120)]

TRICKLERS = 1000
HEADER_TIMEOUT = 3.0
#: How late after the header timeout a trickling connection may be closed.  Arming the timer
#: happens at accept, and 1,000 simultaneous expiries are answered in one burst.
CLOSE_MARGIN = 1.5
P99_LIMIT = 0.100
#: A head that cannot end before the timeout at one byte per second.
HEAD = b"GET /pid HTTP/1.1\r\nHost: slowloris.test\r\nX-Slow: " + b"s" * 200


@dataclasses.dataclass
class Trickle:
    """What one trickling connection saw (times on the trickling thread's loop clock)."""

    #: When the connect started: the server cannot accept (and arm its timer) before this.
    attempted: float = 0.0
    opened: float = 0.0
    closed: float | None = None
    sent: int = 0
    received: bytes = b""
    error: str | None = None


async def _trickle(host: str, port: int, record: Trickle, stop_at: float) -> None:
    loop = asyncio.get_running_loop()
    record.attempted = loop.time()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        record.error = f"connect failed: {exc!r}"
        return
    record.opened = loop.time()
    try:
        while loop.time() < stop_at:
            next_byte = record.opened + record.sent + 1.0
            if record.sent < len(HEAD):
                try:
                    writer.write(HEAD[record.sent : record.sent + 1])
                    await writer.drain()
                    record.sent += 1
                except ConnectionError:
                    pass  # the server closed; the read below sees it
            while loop.time() < min(next_byte, stop_at):
                try:
                    data = await asyncio.wait_for(
                        reader.read(4096), max(0.0, min(next_byte, stop_at) - loop.time())
                    )
                except TimeoutError:
                    break
                except ConnectionError:
                    data = b""
                if not data:
                    record.closed = loop.time()
                    return
                record.received += data
    finally:
        writer.close()


def _run_tricklers(
    host: str, port: int, records: list[Trickle], all_open: threading.Event
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + HEADER_TIMEOUT + CLOSE_MARGIN + 10.0
        tasks = [
            asyncio.ensure_future(_trickle(host, port, record, stop_at)) for record in records
        ]
        while any(r.opened == 0.0 and r.error is None for r in records):
            if loop.time() > stop_at:
                break
            await asyncio.sleep(0.01)
        all_open.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())


@pytest.fixture(scope="module")
def server() -> Iterator[GunicornServer]:
    raise_nofile_limit(3 * TRICKLERS)
    with gunicorn_server(
        CONTRACT_APP,
        args=["--worker-connections", str(2 * TRICKLERS + 100), "--backlog", "2048"],
        env={"ASYNC_HANDLER_HEADER_TIMEOUT": str(HEADER_TIMEOUT)},
    ) as srv:
        yield srv


def test_slowloris_does_not_starve_normal_clients(server: GunicornServer) -> None:
    pid = server.worker_pid()
    records = [Trickle() for _ in range(TRICKLERS)]
    all_open = threading.Event()
    thread = threading.Thread(
        target=_run_tricklers,
        args=(server.host, server.port, records, all_open),
        name="tricklers",
        daemon=True,
    )
    thread.start()
    assert all_open.wait(30), "the trickling connections did not open within 30 s"
    errors = [r.error for r in records if r.error]
    assert not errors, f"{len(errors)} trickling connections failed to open: {errors[:3]}"

    latencies: list[float] = []
    failures: list[str] = []
    keep = server.client(timeout=5)
    deadline = time.monotonic() + HEADER_TIMEOUT + CLOSE_MARGIN + 10.0
    try:
        while thread.is_alive() and time.monotonic() < deadline:
            fresh = len(latencies) % 2 == 1
            started = time.perf_counter()
            try:
                if fresh:
                    with server.client(timeout=5) as client:
                        response = client.request("GET", "/pid", [("Connection", "close")])
                else:
                    response = keep.request("GET", "/pid")
            except (OSError, pytest.fail.Exception) as exc:
                failures.append(repr(exc))
                keep.close()
                keep = server.client(timeout=5)
                continue
            latencies.append(time.perf_counter() - started)
            if response.status != 200:
                failures.append(f"status {response.status}")
    finally:
        keep.close()
    thread.join(5)
    assert not thread.is_alive(), "tricklers still running after the bound"

    p50 = percentile(latencies, 50)
    p99 = percentile(latencies, 99)
    report = (
        f"{len(latencies)} normal requests during the attack: p50 {p50 * 1000:.2f} ms, "
        f"p99 {p99 * 1000:.2f} ms, max {max(latencies) * 1000:.2f} ms"
    )
    print(report)
    assert not failures, f"normal requests failed: {failures[:5]}; {report}"
    assert len(latencies) >= 100, report
    assert p99 < P99_LIMIT, report

    lifetimes = sorted(r.closed - r.attempted for r in records if r.closed is not None)
    never = [r for r in records if r.closed is None]
    assert not never, (
        f"{len(never)} trickling connections were never closed by the server "
        f"(sent {never[0].sent} bytes, got {never[0].received[:200]!r})"
    )
    print(
        f"trickling connections closed after {lifetimes[0]:.2f}-{lifetimes[-1]:.2f} s "
        f"(median {percentile(lifetimes, 50):.2f} s) for a {HEADER_TIMEOUT} s header timeout"
    )
    # 10 ms of slack for the two processes' timer granularity.
    assert lifetimes[0] >= HEADER_TIMEOUT - 0.01, f"closed before the timeout: {lifetimes[:5]}"
    assert lifetimes[-1] <= HEADER_TIMEOUT + CLOSE_MARGIN, f"closed late: {lifetimes[-5:]}"
    not_408 = [r.received[:60] for r in records if not r.received.startswith(b"HTTP/1.1 408 ")]
    assert not not_408, f"{len(not_408)} trickling connections not answered 408: {not_408[:3]}"
    assert server.worker_pid() == pid, f"the worker changed:\n{server.log_tail()}"
