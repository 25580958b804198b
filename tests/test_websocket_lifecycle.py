"""A WebSocket's life under a real gunicorn worker: how it ends, what it leaves behind, and how
the worker's limits and stops treat it.

The probe view (``/ws/life/<tag>/``, tests/djproject/ws_views.py) writes its life to the server's
event log: ``open``, then ``disconnect <code>`` (``receive()`` raised WebSocketDisconnect) or
``cancelled <code>`` (the view was cancelled), and Django's ``request_finished`` for that request
as ``finished <path>``.  Clients are raw sockets (tests/ws_raw.py) where a library client would
hide the difference between a FIN, a RST and a close frame.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from async_handler.websocket import FINISH_GRACE
from tests._support import raise_nofile_limit
from tests.server import GunicornServer
from tests.ws_raw import (
    close_frame,
    handshake,
    parse_frames,
    read_frame,
    set_rst_on_close,
    text_frame,
)

DJANGO_APP = "tests.djproject.wsgi:application"


def _server(*args: str, env: dict[str, str] | None = None) -> GunicornServer:
    return GunicornServer(
        DJANGO_APP,
        args=["--threads", "2", "--worker-connections", "2000", "--graceful-timeout", "5", *args],
        env=env,
        ready_path="/async/hello/",
    )


#: The module worker's finish grace (settings.ASYNC_HANDLER_WS_FINISH_GRACE), shorter than the
#: default FINISH_GRACE so that waiting it out costs the suite seconds, not tens of seconds.
GRACE = 2.0


@pytest.fixture(scope="module")
def worker() -> Iterator[GunicornServer]:
    with _server(env={"DJPROJECT_WS_FINISH_GRACE": str(GRACE)}) as server:
        yield server


def _open(server: GunicornServer, path: str, timeout: float = 10.0) -> socket.socket:
    """A raw socket past its 101 (the server sends nothing more until the client does)."""
    sock = socket.create_connection((server.host, server.port), timeout=timeout)
    sock.sendall(handshake(path))
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed during the handshake: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101 "), head
    return sock


def _recv_frames(sock: socket.socket, until_opcode: int) -> list[tuple[int, bytes]]:
    data = b""
    while True:
        frames = parse_frames(data)
        if any(op == until_opcode for op, _ in frames):
            return frames
        chunk = sock.recv(65536)
        assert chunk, f"EOF before a frame with opcode {until_opcode}: {data!r}"
        data += chunk


def _eventually(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _wait_event(server: GunicornServer, line: str, timeout: float = 10.0) -> None:
    assert _eventually(lambda: line in server.events(), timeout), (line, server.events())


def _resources(server: GunicornServer) -> dict[str, int]:
    response = httpx.get(f"{server.url}/observe/resources/", headers={"Connection": "close"})
    return response.json()


# -- how a socket ends: the view's path, and request_finished exactly once


@pytest.mark.parametrize("where", ["receive", "sleep"])
@pytest.mark.parametrize("how", ["fin", "rst", "close"])
def test_the_view_ends_and_request_finished_fires_once(worker, how, where):
    tag = f"{how}-{where}"
    sock = _open(worker, f"/ws/life/{tag}/")
    _wait_event(worker, f"open {tag}")
    if where == "receive":
        sock.sendall(text_frame("ping"))
        assert _recv_frames(sock, 0x1) == [(0x1, b"ping")]  # back in receive()
    else:
        sock.sendall(text_frame("sleep"))
        _wait_event(worker, f"sleeping {tag}")  # inside a 60 s await that is not receive()
    started = time.monotonic()
    if how == "close":
        sock.sendall(close_frame(1000))
        assert _recv_frames(sock, 0x8)[-1] == (0x8, (1000).to_bytes(2, "big"))
        assert sock.recv(65536) == b""  # the server closes the TCP connection first
    elif how == "rst":
        set_rst_on_close(sock)
    sock.close()

    code = 1000 if how == "close" else 1006
    finished = f"finished /ws/life/{tag}/"
    if where == "receive":
        # receive() raises WebSocketDisconnect with the code; the view returns by itself.
        _wait_event(worker, f"returned {tag}")
        expected = [f"open {tag}", f"disconnect {tag} {code}", f"returned {tag}", finished]
    elif how == "close":
        # A clean close leaves the view its finish grace to return by itself, then cancels it.
        time.sleep(GRACE / 2)
        assert finished not in worker.events()
        _wait_event(worker, finished, timeout=GRACE + 10)
        assert time.monotonic() - started >= GRACE
        expected = [f"open {tag}", f"sleeping {tag}", f"cancelled {tag} {code}", finished]
    else:
        # The client vanished: the view is cancelled at once.
        _wait_event(worker, finished, timeout=5)
        assert time.monotonic() - started < 5
        expected = [f"open {tag}", f"sleeping {tag}", f"cancelled {tag} {code}", finished]
    time.sleep(0.3)  # a second request_finished would come right after the first
    mine = [e for e in worker.events() if tag in e]
    assert mine == expected


# -- nothing grows


@pytest.mark.load
def test_no_fd_task_or_thread_growth_over_10000_cycles():
    """Handshake, one echo, then a clean close, a FIN or a RST, 16 at a time.  A quarter of the
    sockets run a query through a pool thread (``db``).  The async-only middleware stack keeps
    the worker's share of the CPU, hence the run, short."""
    raise_nofile_limit(4096)
    echo, probe = handshake("/ws/echo/"), handshake("/ws/probe/soak/")
    hello, db, bye = text_frame("hi"), text_frame("db"), close_frame(1000)

    async def cycle(i: int) -> None:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        query = i % 8 in (0, 5)
        writer.write(probe if query else echo)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        writer.write(db if query else hello)
        assert await read_frame(reader) == (0x1, b"db 1" if query else b"hi")
        if i % 4 in (0, 2):
            writer.write(bye)
            assert (await read_frame(reader))[0] == 0x8
            assert await reader.read() == b""
        elif i % 4 == 3:
            set_rst_on_close(writer.get_extra_info("socket"))
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass

    async def cycles(count: int, concurrency: int = 16) -> None:
        numbers = iter(range(count))

        async def client() -> None:
            for i in numbers:
                await asyncio.wait_for(cycle(i), 10)

        await asyncio.gather(*(client() for _ in range(concurrency)))

    with _server(env={"DJPROJECT_MIDDLEWARE": "async"}) as server:
        asyncio.run(cycles(500))  # warm-up: every code path and thread once
        time.sleep(0.5)
        base = _resources(server)
        started = time.monotonic()
        asyncio.run(cycles(10_000))
        elapsed = time.monotonic() - started

        after: list[dict[str, int]] = []

        def settled() -> bool:
            after.append(_resources(server))
            now = after[-1]
            return all(now[k] == base[k] for k in ("fds", "tasks", "threads"))

        # Dropped sockets end as soon as the worker reads their FIN or RST: allow it a moment.
        assert _eventually(settled, 10), (base, after[-1])
    now = after[-1]
    assert now["pid"] == base["pid"]
    # A leak of one object per cycle would be 10,000; a few are caches filled once.
    assert now["objects"] - base["objects"] < 100, (base, now)
    print(f"10,000 cycles in {elapsed:.1f}s; before {base}, after {now}")


# -- the worker's stops and limits


def test_sigterm_waits_for_the_close_handshake_then_exits_cleanly():
    with _server() as server:
        pid = _resources(server)["pid"]
        sock = _open(server, "/ws/life/term/")
        _wait_event(server, "open term")
        started = time.monotonic()
        os.kill(server.master_pid, signal.SIGTERM)
        assert _recv_frames(sock, 0x8)[-1][1][:2] == (1012).to_bytes(2, "big")
        # The worker waits for our answer (within graceful_timeout) instead of exiting.
        time.sleep(1.0)
        os.kill(pid, 0)
        assert server.proc is not None and server.proc.poll() is None
        sock.sendall(close_frame(1012))
        assert sock.recv(65536) == b""  # closing handshake done: the server closes TCP
        sock.close()
        assert server.proc.wait(10) == 0
        elapsed = time.monotonic() - started
        log = server.log_text()
        assert "Graceful timeout" not in log, log
        assert f"Worker exiting (pid: {pid})" in log
        assert elapsed < 5, elapsed  # well before graceful_timeout would have cut it
        assert [e for e in server.events() if "term" in e] == [
            "open term",
            "disconnect term 1012",
            "returned term",
            "finished /ws/life/term/",
        ]


def test_sigterm_cuts_a_view_in_its_finish_grace_and_still_sends_request_finished():
    # graceful_timeout (5 s) is shorter than FINISH_GRACE: the worker cancels the view before
    # the arbiter's SIGKILL, and the request still ends with request_finished.
    assert FINISH_GRACE > 5
    with _server() as server:
        sock = _open(server, "/ws/life/grace/")
        sock.sendall(text_frame("sleep"))
        _wait_event(server, "sleeping grace")
        sock.sendall(close_frame(1000))
        _recv_frames(sock, 0x8)
        sock.close()
        os.kill(server.master_pid, signal.SIGTERM)
        assert server.proc is not None and server.proc.wait(10) == 0
        assert "Worker exiting" in server.log_text()  # it was not SIGKILLed
        assert [e for e in server.events() if "grace" in e] == [
            "open grace",
            "sleeping grace",
            "cancelled grace 1000",
            "finished /ws/life/grace/",
        ]


def test_max_requests_recycles_the_worker_closing_its_sockets_with_1012():
    # gunicorn counts a WebSocket as one request when it ends; HTTP requests count as they end.
    with _server("--max-requests", "20") as server:

        async def main() -> tuple[list[int | None], int, int]:
            # Over HTTP from a thread: this loop must stay free to answer the close frames.
            first = (await asyncio.to_thread(_resources, server))["pid"]
            url = f"ws://{server.host}:{server.port}/ws/echo/"
            sockets = [await connect(url) for _ in range(3)]
            requests = 0
            while requests < 30:
                requests += 1
                pid = (await asyncio.to_thread(_resources, server))["pid"]
                if pid != first or all(ws.close_code is not None for ws in sockets):
                    break
            for ws in sockets:
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)
            return [ws.close_code for ws in sockets], requests, first

        codes, requests, first = asyncio.run(main())
        assert codes == [1012] * 3
        assert requests <= 20
        assert _resources(server)["pid"] != first
        server.wait_for_log("Autorestarting worker after current request")

        async def replacement() -> None:
            async with connect(f"ws://{server.host}:{server.port}/ws/echo/") as ws:
                await ws.send("new worker")
                assert await ws.recv() == "new worker"

        asyncio.run(replacement())


def test_max_requests_counts_each_websocket_once_it_ends():
    with _server("--max-requests", "10") as server:
        first = _resources(server)["pid"]

        async def sockets(count: int) -> None:
            for _ in range(count):
                async with connect(f"ws://{server.host}:{server.port}/ws/echo/") as ws:
                    await ws.send("one")
                    assert await ws.recv() == "one"

        asyncio.run(sockets(12))  # with the probes before, well past 10 requests
        server.wait_for_log("Autorestarting worker after current request")
        assert _eventually(lambda: _resources(server)["pid"] != first, 10)


def test_worker_connections_counts_sockets():
    with _server("--worker-connections", "50") as server:
        sockets = [_open(server, f"/ws/echo/?n={i}") for i in range(50)]
        # The 51st is left in the listen backlog, as gunicorn's own workers do past the limit:
        # the kernel completes TCP, nobody answers the handshake.
        extra = socket.create_connection((server.host, server.port), timeout=1.5)
        extra.sendall(handshake("/ws/echo/"))
        with pytest.raises(TimeoutError):
            extra.recv(65536)
        for sock in sockets[:5]:
            sock.sendall(close_frame(1000))
            _recv_frames(sock, 0x8)
            sock.close()
        extra.settimeout(10)
        assert extra.recv(65536).startswith(b"HTTP/1.1 101 ")
        sockets = [*sockets[5:], extra]
        sockets += [_open(server, "/ws/echo/") for _ in range(4)]  # 50 again
        for sock in sockets:
            sock.sendall(text_frame("still here"))
            assert _recv_frames(sock, 0x1)[-1] == (0x1, b"still here")
            sock.close()


# -- W003 in gunicorn's log


@pytest.mark.parametrize("workers", [1, 2])
def test_w003_is_logged_at_boot_with_several_workers(workers):
    # WEB_CONCURRENCY disagrees on purpose: the worker exports gunicorn's own count.
    env = {"WEB_CONCURRENCY": "1" if workers > 1 else "4"}
    with _server("--workers", str(workers), env=env) as server:
        server.wait_for_log(r"async_handler worker: .* event loop")
        if workers > 1:
            assert _eventually(
                lambda: server.log_text().count("async_handler.W003") == workers, 10
            ), server.log_tail()
            assert "2 workers but no CHANNEL_LAYERS" in server.log_text()
        else:
            time.sleep(0.5)
            assert "W003" not in server.log_text()
