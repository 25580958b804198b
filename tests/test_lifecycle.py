"""The worker under gunicorn's process management: signals, max_requests, the arbiter timeout.

Each test starts its own gunicorn (the arbiter replaces or stops workers, so nothing is shared),
drives real load through real sockets and counts failed requests: the contract with the arbiter
is that restarts and reloads lose none.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time

import pytest

from tests._support import raise_nofile_limit
from tests.server import CONTRACT_APP, Response, async_request, gunicorn_server, wait_until

pytestmark = [pytest.mark.server, pytest.mark.timeout(90)]


def _count_calls(lines: list[str], prefix: str) -> int:
    return sum(1 for line in lines if line.startswith(prefix))


@pytest.mark.slow
def test_sigterm_completes_100_requests_in_flight() -> None:
    raise_nofile_limit(1024)
    with gunicorn_server(CONTRACT_APP, ["--graceful-timeout", "20"]) as srv:
        mark = srv.call_mark()

        async def main() -> list[Response | BaseException]:
            tasks = [
                asyncio.ensure_future(async_request(srv.port, "/sleep?s=2", timeout=30.0))
                for _ in range(100)
            ]
            # Signal only once every request reached the app: they are truly in flight.
            deadline = time.monotonic() + 15.0
            while _count_calls(srv.calls_since(mark), "GET /sleep") < 100:
                if time.monotonic() > deadline or any(t.done() for t in tasks):
                    break
                await asyncio.sleep(0.02)
            srv.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(main())
        assert _count_calls(srv.calls_since(mark), "GET /sleep") == 100
        failures = [r for r in results if not isinstance(r, Response) or r.status != 200]
        assert not failures, f"{len(failures)} of 100 in-flight requests failed: {failures[:3]!r}"
        assert srv.proc is not None
        srv.proc.wait(25)
        assert srv.proc.returncode == 0, srv.log_tail()


class Load:
    """Sequential new-connection requests from ``threads`` threads until stopped; counts."""

    def __init__(self, port: int, path: str = "/pid", threads: int = 8) -> None:
        self.port = port
        self.path = path
        self.ok = 0
        self.failures: list[str] = []
        self.pids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        async def loop() -> None:
            while not self._stop.is_set():
                try:
                    response = await async_request(self.port, self.path, timeout=20.0)
                except (OSError, TimeoutError) as exc:
                    with self._lock:
                        self.failures.append(repr(exc))
                    continue
                with self._lock:
                    if response.status == 200:
                        self.ok += 1
                        if self.path == "/pid":
                            self.pids.add(response.json()["pid"])
                    else:
                        self.failures.append(f"{response.status} {response.body[:100]!r}")

        asyncio.run(loop())

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self._threads), "load threads did not stop"

    def wait_for(self, requests: int, timeout: float) -> None:
        """Wait until ``requests`` requests succeeded in total."""
        wait_until(lambda: self.ok >= requests or len(self.failures) > 20, timeout, "load")


@pytest.mark.slow
def test_max_requests_under_load_fails_no_request() -> None:
    with gunicorn_server(CONTRACT_APP, ["--max-requests", "50"]) as srv:
        first = srv.worker_pid()
        with Load(srv.port) as load:
            load.wait_for(400, 60.0)
        assert not load.failures, f"{len(load.failures)} failed: {load.failures[:5]}"
        # 400 requests at 50 per worker: the arbiter replaced the worker several times.
        assert len(load.pids | {first}) >= 5, load.pids
        log = srv.log_text()
        assert "Traceback" not in log, srv.log_tail()


@pytest.mark.slow
def test_hup_reload_under_load_fails_no_request() -> None:
    with gunicorn_server(CONTRACT_APP) as srv:
        first = srv.worker_pid()
        with Load(srv.port) as load:
            load.wait_for(100, 30.0)
            srv.send_signal(signal.SIGHUP)
            srv.wait_for_log(r"Handling signal: hup", timeout=10.0)
            wait_until(lambda: bool(load.pids - {first}), 20.0, "a reloaded worker to serve")
            served = load.ok
            load.wait_for(served + 100, 30.0)
        assert not load.failures, f"{len(load.failures)} failed: {load.failures[:5]}"
        assert first in load.pids and len(load.pids) >= 2, load.pids
        # The old worker exited on its own, not on the arbiter's kill.
        assert not re.search(rf"Worker \(pid:{first}\) was sent SIGKILL", srv.log_text())


@pytest.mark.slow
def test_blocked_loop_gets_the_worker_killed_and_replaced() -> None:
    # The worker heartbeats from its loop; a view that blocks the loop longer than --timeout
    # silences it and the arbiter must kill and replace it (gunicorn's WORKER TIMEOUT).
    with gunicorn_server(CONTRACT_APP, ["--timeout", "2"]) as srv:
        pid = srv.worker_pid()
        with srv.client(timeout=30.0) as client:
            client.send(b"GET /block?s=60 HTTP/1.1\r\nHost: a\r\n\r\n")
            new_pid = srv.wait_for_new_worker(pid, timeout=30.0)
            assert client.is_closed(10.0), "the blocked request's connection outlived its worker"
        assert new_pid != pid
        srv.wait_for_log(rf"WORKER TIMEOUT \(pid:{pid}\)", timeout=5.0)
        assert srv.get("/echo").status == 200


def test_usr1_does_not_kill_the_worker() -> None:
    with gunicorn_server(CONTRACT_APP) as srv:
        pid = srv.worker_pid()
        # Straight to the worker: a request it answers afterwards ran after the signal was
        # delivered, so an unhandled SIGUSR1 (default action: terminate) would have shown.
        os.kill(pid, signal.SIGUSR1)
        assert srv.worker_pid() == pid
        log_start = len(srv.log_text())
        srv.send_signal(signal.SIGUSR1)
        srv.wait_for_log(r"Handling signal: usr1", timeout=10.0, start=log_start)
        for _ in range(3):
            assert srv.worker_pid() == pid
        assert f"Worker (pid:{pid}) was sent" not in srv.log_text(), srv.log_tail()
        assert f"Worker (pid:{pid}) exited" not in srv.log_text(), srv.log_tail()
