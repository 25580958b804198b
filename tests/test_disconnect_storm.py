"""Disconnect storm: 1,000 clients leave in the middle of their views; nothing may leak.

A real gunicorn runs our worker (``--threads 8``) on the Django test project with the async-only
middleware chain and a PostgreSQL alias whose sessions carry a unique ``application_name``.
After a warm-up that starts every pool thread (and its database connection), 1,000 connections
each start a view: 960 ``/async/sleep/?s=30`` (tagged), then 40 ``/sync/db/?s=2`` (PostgreSQL,
then a 2 s sleep in a pool thread; 8 run, 32 wait for a thread).  Once every async view has
started and every pool thread is inside a sync view, all clients disconnect, half with FIN and
half with RST.  Then:

* every async view was cancelled (its ``cancelled <tag>`` event);
* Django's ``request_finished`` fired once per ``request_started`` (minus the observing request);
* PostgreSQL holds no more sessions for the worker than it has threads;
* the loop's task count, the thread count and the worker's descriptors are back to baseline;
* the same worker still answers.
"""

from __future__ import annotations

import socket
import struct
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests._support import missing, raise_nofile_limit
from tests.reliability import PG_DSN, fd_count, pg_sessions, pg_unavailable
from tests.server import GunicornServer, wait_until

pytestmark = [pytest.mark.load, pytest.mark.postgres, pytest.mark.timeout(180)]

DJANGO_APP = "tests.djproject.wsgi:application"
THREADS = 8
ASYNC_CLIENTS = 960
SYNC_CLIENTS = 40
PREFIX = "storm"


def _observe(server: GunicornServer) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/observe/storm/", params={"prefix": PREFIX}, timeout=10)
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


def _pg_rows(query: str, *args: Any) -> list[Any]:
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        return conn.execute(query, args).fetchall()


def _pg(query: str, *args: Any) -> Any:
    rows = _pg_rows(query, *args)
    return rows[0][0] if rows else None


@pytest.fixture(scope="module")
def appname() -> str:
    reason = pg_unavailable()
    if reason is not None:
        missing(reason)
    return f"ah_storm_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def server(appname: str) -> Iterator[GunicornServer]:
    raise_nofile_limit(3000)
    srv = GunicornServer(
        DJANGO_APP,
        args=["--threads", str(THREADS), "--worker-connections", "3000", "--timeout", "120"],
        env={"DJPROJECT_MIDDLEWARE": "async", "PG_APPNAME": appname},
        ready_path="/async/hello/",
    )
    with srv:
        yield srv
    # The worker is gone: its sessions must be gone too.
    deadline = time.monotonic() + 10
    while pg_sessions(appname) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pg_sessions(appname) == 0, "PostgreSQL sessions outlived the worker"


def _send(server: GunicornServer, path: str, *, close: bool = False) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=10)
    extra = "Connection: close\r\n" if close else ""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
    return sock


def _read_to_close(sock: socket.socket, timeout: float = 30.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return data


def _gap(data: dict[str, Any]) -> int:
    """request_started minus request_finished as an observation reports them.

    Whether the observing request itself counts as finished when it reads the counters depends
    on when the handler sends request_finished; it is the same for every observation, so the
    tests compare this gap with the gap at a quiet moment.
    """
    return int(data["signals"]["started"] - data["signals"]["finished"])


def test_disconnect_storm_cancels_everything_and_leaks_nothing(
    server: GunicornServer, appname: str
) -> None:
    quiet = _observe(server)
    # Warm-up: twice as many sync DB views as threads, at once, so every pool thread starts and
    # holds its persistent connection (CONN_MAX_AGE=60) before the baseline is taken.  The
    # clients ask the server to close and wait for it, so that none leaves before the response
    # is closed (see test_request_finished_when_clients_leave_after_the_response).
    warm = [_send(server, "/sync/db/?s=0.3", close=True) for _ in range(2 * THREADS)]
    for sock in warm:
        assert _read_to_close(sock).startswith(b"HTTP/1.1 200 "), "warm-up request failed"
    wait_until(lambda: _gap(_observe(server)) <= _gap(quiet), 10, "the warm-up to finish")
    baseline = _observe(server)
    pid = baseline["pid"]
    base_fds = fd_count(pid)
    base_pg = pg_sessions(appname)
    assert 1 <= base_pg <= THREADS, f"{base_pg} sessions after warm-up for {THREADS} threads"

    storm_started = _pg("SELECT now()")
    socks: list[socket.socket] = []
    try:
        for i in range(ASYNC_CLIENTS):
            socks.append(_send(server, f"/async/sleep/?s=30&tag={PREFIX}{i}"))
        # The async views start first: the test project's request_started counter is a sync
        # receiver, so each request needs a pool thread for a moment before its view runs, and
        # a pool saturated by 2 s sync views would hold the async views back.
        wait_until(
            lambda: _observe(server)["started"] == ASYNC_CLIENTS,
            30,
            f"all {ASYNC_CLIENTS} async views to start",
        )
        # Then more sync DB views than threads: every thread busy, the rest queued.
        socks += [_send(server, "/sync/db/?s=2") for _ in range(SYNC_CLIENTS)]
        # Every pool thread is inside a sync view when its session ran the view's first query
        # after the storm began (the view then sleeps 2 s between its two queries).
        sessions: list[Any] = []

        def threads_busy() -> bool:
            sessions[:] = _pg_rows(
                "SELECT query, query_start >= %s FROM pg_stat_activity "
                "WHERE application_name = %s",
                storm_started,
                appname,
            )
            return sum(1 for query, recent in sessions if query == "SELECT 1" and recent) >= THREADS

        deadline = time.monotonic() + 15
        while not threads_busy():
            if time.monotonic() > deadline:
                pytest.fail(
                    f"not every pool thread entered a sync DB view within 15 s: sessions "
                    f"{sessions}, server {_observe(server)}\n{server.log_tail()}"
                )
            time.sleep(0.05)
        mid = _observe(server)
        assert mid["cancelled"] == 0, "views were cancelled before the clients left"
    finally:
        for i, sock in enumerate(socks):
            if i % 2:
                # RST instead of FIN: SO_LINGER on with a zero timeout.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
    left_at = time.monotonic()

    after: dict[str, Any] = {}

    def settled() -> bool:
        after.update(_observe(server))
        return after["cancelled"] >= ASYNC_CLIENTS and _gap(after) == _gap(baseline)

    wait_until(settled, 60, f"every view to end after the disconnect (last: {after})")
    settle_time = time.monotonic() - left_at
    summary = (
        f"storm: {ASYNC_CLIENTS} async + {SYNC_CLIENTS} sync(DB) views, clients left; settled "
        f"in {settle_time:.2f} s; cancelled {after['cancelled']}/{ASYNC_CLIENTS}; "
        f"request_started +{after['signals']['started'] - baseline['signals']['started']} / "
        f"request_finished +{after['signals']['finished'] - baseline['signals']['finished']}; "
        f"tasks {baseline['tasks']} -> {after['tasks']}; threads "
        f"{baseline['threads']} -> {after['threads']}"
    )
    assert after["started"] == ASYNC_CLIENTS
    assert after["cancelled"] == ASYNC_CLIENTS, summary
    # Tasks still closing their body (a disconnect no longer cancels that) may finish a little
    # after the signals.
    latest: dict[str, Any] = {}

    def back_to_baseline() -> bool:
        latest.update(_observe(server))
        return latest["tasks"] <= baseline["tasks"] and latest["threads"] <= baseline["threads"]

    deadline = time.monotonic() + 10
    while not back_to_baseline() and time.monotonic() < deadline:
        time.sleep(0.1)
    summary += f"; once closed: tasks {latest['tasks']}, threads {latest['threads']}"
    assert latest["tasks"] <= baseline["tasks"], summary
    assert latest["threads"] <= baseline["threads"], summary

    pg_after = pg_sessions(appname)
    fds: list[int] = []

    def fds_back() -> bool:
        fds.append(fd_count(pid))
        # A session opened or closed since the baseline moves the count by one socket.
        return fds[-1] <= base_fds + max(0, pg_sessions(appname) - base_pg)

    wait_until(fds_back, 15, f"the worker's descriptors back to {base_fds} (last {fds[-1:]})")
    summary += f"; PG sessions {base_pg} -> {pg_after} (<= {THREADS}); fds {base_fds} -> {fds[-1]}"
    print(summary)
    assert pg_after <= THREADS, summary
    final = httpx.get(f"{server.url}/async/hello/", timeout=10)
    assert final.status_code == 200
    assert _observe(server)["pid"] == pid, f"the worker was replaced:\n{server.log_tail()}"


def test_request_finished_when_clients_leave_after_the_response() -> None:
    """16 clients, 8 threads: each reads its whole response and closes at once; every request
    must still end with request_finished.  The response's close() runs after the client left,
    while the pool is busy with the next views: a server that cancels the request task during
    ``body.aclose()`` loses the signal (and Django's connection housekeeping with it)."""
    with GunicornServer(
        DJANGO_APP,
        args=["--threads", str(THREADS)],
        env={"DJPROJECT_MIDDLEWARE": "async"},
        ready_path="/async/hello/",
    ) as srv:
        quiet = _observe(srv)
        socks = [_send(srv, "/sync/sleep/?s=0.3") for _ in range(2 * THREADS)]
        for sock in socks:
            sock.settimeout(30)
            data = b""
            while b"slept" not in data:
                chunk = sock.recv(65536)
                assert chunk, f"closed before the response: {data!r}"
                data += chunk
            sock.close()
        last: dict[str, Any] = {}

        def finished() -> bool:
            last.update(_observe(srv))
            return _gap(last) == _gap(quiet)

        deadline = time.monotonic() + 10
        while not finished() and time.monotonic() < deadline:
            time.sleep(0.1)
        missing_signals = _gap(last) - _gap(quiet)
        assert missing_signals == 0, (
            f"{missing_signals} of {2 * THREADS} requests never sent request_finished: {last}"
        )
