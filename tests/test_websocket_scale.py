"""5,000 idle WebSockets on one worker: pings answered, memory per socket against uvicorn +
Channels, and HTTP latency on the same worker meanwhile.

One gunicorn worker (our ``AsyncioWorker``) serves ``ws/echo/`` of the test project with pings
every 1.5 seconds; one client process (:mod:`tests.ws_swarm`, websockets' sans-IO protocol)
opens the sockets and answers every ping.  The same client then opens as many on uvicorn
(``--ws websockets``) running the same project through Django's ASGI handler and a Channels
``AsyncWebsocketConsumer`` that accepts and idles.  Both run the async-only middleware stack
(``DJPROJECT_MIDDLEWARE=async``): neither pays for layers the other skips.

Memory per socket is the server process's RSS after the sockets opened minus before, divided by
their number, after a warm-up batch has loaded everything a socket touches.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests._support import REPO_ROOT, free_port, missing, raise_nofile_limit, wait_serving
from tests.server import GunicornServer
from tests.ws_swarm import SwarmSocket, child_pids, open_swarm, read_rss

pytestmark = [pytest.mark.slow, pytest.mark.load, pytest.mark.timeout(240)]

SOCKETS = 5000
WARM_UP = 200
PING_INTERVAL = 1.5
PING_TIMEOUT = 2.0
# Past interval + timeout, a socket whose pongs were not seen would have been closed (1011).
HOLD = PING_INTERVAL + PING_TIMEOUT + 1.0
HTTP_REQUESTS = 200
ENV = {"DJPROJECT_MIDDLEWARE": "async"}


@dataclass
class Figures:
    server: str
    before: int
    after: int
    open_seconds: float

    @property
    def per_socket(self) -> float:
        return (self.after - self.before) / SOCKETS

    def line(self) -> str:
        return (
            f"{self.server}: RSS {self.before / 2**20:.0f} -> {self.after / 2**20:.0f} MiB, "
            f"{self.per_socket / 1024:.1f} KiB per socket; {SOCKETS} opened in "
            f"{self.open_seconds:.1f}s"
        )


# Run in a process of its own, so that the client's 5,000 sockets (and their pongs) share no
# interpreter lock with the requests being timed.
_PROBE = """
import http.client, json, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conn = http.client.HTTPConnection(host, port, timeout=10)
latencies = []
for _ in range(count):
    started = time.perf_counter()
    conn.request("GET", "/async/hello/")
    response = conn.getresponse()
    body = response.read()
    latencies.append(time.perf_counter() - started)
    assert response.status == 200, (response.status, body[:200])
    time.sleep(0.01)
conn.close()
print(json.dumps(latencies))
"""


async def _http_latencies(host: str, port: int, count: int) -> list[float]:
    """``count`` sequential GETs of ``/async/hello/`` on one keep-alive connection, spaced so
    that they spread over the ping periods; the seconds each took."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PROBE, host, str(port), str(count), stdout=subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, "the HTTP probe failed"
    latencies: list[float] = json.loads(out)
    return latencies


def _abort(sockets: list[SwarmSocket]) -> None:
    for sock in sockets:
        if sock.transport is not None:
            sock.transport.abort()


async def _warm_up(host: str, port: int) -> None:
    # Imports, caches and allocator arenas a socket needs, loaded before "before" is read.
    warm = await open_swarm(host, port, ["/ws/echo/"] * WARM_UP)
    _abort(warm)
    await asyncio.sleep(0.5)


async def _ours(server: GunicornServer, pid: int) -> tuple[Figures, list[float], list[int]]:
    host, port = server.host, server.port
    await _warm_up(host, port)
    before = read_rss(pid)
    started = time.monotonic()
    sockets = await open_swarm(host, port, ["/ws/echo/"] * SOCKETS)
    opened = time.monotonic() - started
    pings_at_open = [s.pings for s in sockets]
    try:
        # HTTP on the same worker while every socket is open and pinged.
        probe = asyncio.ensure_future(_http_latencies(host, port, HTTP_REQUESTS))
        await asyncio.sleep(HOLD)
        latencies = await probe
        after = read_rss(pid)
        closed = [s for s in sockets if not s.is_open]
        assert not closed, (
            f"{len(closed)} of {SOCKETS} sockets closed while idle, close codes "
            f"{sorted({s.close_code for s in closed}, key=str)}; log:\n{server.log_tail()}"
        )
        pings = [s.pings - at_open for s, at_open in zip(sockets, pings_at_open, strict=True)]
    finally:
        _abort(sockets)
    return Figures("ours (gunicorn AsyncioWorker)", before, after, opened), latencies, pings


@contextlib.contextmanager
def _uvicorn() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="ah-uvicorn-", suffix=".log")
    # uvicorn's default pings (20 s): at 1 s, uvicorn + Channels could not answer 5,000 sockets
    # on a 2-core machine and closed hundreds of them on ping timeout, which would leave the
    # memory figure without its sockets.  Pings cost no memory worth measuring.
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--ws",
        "websockets",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "tests.djproject.channels_asgi:application",
    ]
    env = {**os.environ, **ENV, "PYTHONPATH": str(REPO_ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )

    def log_text() -> str:
        log.seek(0)
        return log.read().decode(errors="replace")[-5000:]

    def ready(remaining: float) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=min(remaining, 2))
        try:
            conn.request("GET", "/async/hello/")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    try:
        wait_serving(
            proc, "127.0.0.1", port, timeout=30, name="uvicorn", log_text=log_text, ready=ready
        )
        yield proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


async def _theirs(proc: subprocess.Popen[bytes], port: int) -> Figures:
    await _warm_up("127.0.0.1", port)
    before = read_rss(proc.pid)
    started = time.monotonic()
    sockets = await open_swarm("127.0.0.1", port, ["/ws/echo/"] * SOCKETS)
    opened = time.monotonic() - started
    try:
        await asyncio.sleep(1.0)
        after = read_rss(proc.pid)
        closed = sum(not s.is_open for s in sockets)
        assert closed == 0, f"uvicorn closed {closed} idle sockets: no valid comparison"
    finally:
        _abort(sockets)
    return Figures("uvicorn --ws websockets + Channels", before, after, opened)


def test_5000_idle_sockets_answer_pings_cost_no_more_than_channels_and_http_stays_fast():
    for module in ("uvicorn", "channels"):
        try:
            __import__(module)
        except ImportError:
            missing(f"{module} is not installed (the test extra): it is the comparison")
    # Client and server each hold one descriptor per socket, plus the warm-up's.
    raise_nofile_limit(2 * SOCKETS + 2000)
    server = GunicornServer(
        "tests.djproject.wsgi:application",
        args=["--threads", "1", "--worker-connections", str(SOCKETS + 1000)],
        env={
            **ENV,
            "ASYNC_HANDLER_WS_PING_INTERVAL": str(PING_INTERVAL),
            "ASYNC_HANDLER_WS_PING_TIMEOUT": str(PING_TIMEOUT),
        },
        ready_path="/async/hello/",
    )
    with server:
        (pid,) = child_pids(server.master_pid)
        ours, latencies, pings = asyncio.run(_ours(server, pid))
    with _uvicorn() as (proc, port):
        theirs = asyncio.run(_theirs(proc, port))

    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    report = "\n".join(
        [
            ours.line(),
            theirs.line(),
            f"HTTP on our worker meanwhile: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
            f"max {latencies[-1] * 1000:.1f} ms ({len(latencies)} requests)",
            f"pings per socket over {HOLD:.1f}s: min {min(pings)}, max {max(pings)}",
        ]
    )
    print("\n" + report)
    # Every socket saw pings over the hold (about HOLD / PING_INTERVAL of them), and the
    # pongs the client's protocol sent kept every one open (checked in _ours).
    assert min(pings) >= 2, report
    assert p99 < 0.1, report
    assert ours.per_socket <= theirs.per_socket, report
