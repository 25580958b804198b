"""WebSocket views under a real gunicorn worker, driven by the websockets client and raw sockets.

The test project's default middleware stack runs on every handshake: an async-only middleware
(``X-Async-MW`` on the response, ``X-Short-Circuit`` answers), startproject's seven, a sync-only
function middleware (a request through it takes an overflow thread) and a hook-style one.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests._support import raise_nofile_limit
from tests.server import GunicornServer

DJANGO_APP = "tests.djproject.wsgi:application"


def _server(*, threads: int = 1, env: dict[str, str] | None = None) -> GunicornServer:
    return GunicornServer(
        DJANGO_APP,
        args=["--threads", str(threads), "--worker-connections", "2000", "--graceful-timeout", "5"],
        env={"ASYNC_HANDLER_WS_PING_INTERVAL": "1", **(env or {})},
        ready_path="/async/hello/",
    )


@pytest.fixture(scope="module")
def worker():
    with _server() as server:
        yield server


def _ws(server: GunicornServer, path: str) -> str:
    return f"ws://{server.host}:{server.port}{path}"


def _observe(server: GunicornServer) -> dict:
    return httpx.get(f"{server.url}/observe/", timeout=10).json()


def run(coro):
    return asyncio.run(coro)


def test_echo_text_binary_and_large_messages_with_deflate(worker):
    async def main():
        async with connect(_ws(worker, "/ws/echo/")) as ws:
            assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.send(b"\x00\xffbinary")
            assert await ws.recv() == b"\x00\xffbinary"
            big = "é" * 300_000  # 600 kB of UTF-8, fragmented by the client
            await ws.send(big)
            assert await ws.recv() == big
        assert ws.close_code == 1000

    run(main())


def test_a_plain_request_to_a_websocket_view_gets_426(worker):
    response = httpx.get(f"{worker.url}/ws/echo/")
    assert response.status_code == 426
    assert response.headers["Upgrade"] == "websocket"
    assert "WebSocket endpoint" in response.text


def test_handshake_passes_through_the_middleware(worker):
    async def main():
        async with connect(_ws(worker, "/ws/echo/")) as ws:
            headers = ws.response.headers
            # Set by the async-only middleware, by a custom MiddlewareMixin's process_response
            # and by XFrameOptionsMiddleware on the 101.
            assert headers["X-Async-MW"] == "1"
            assert headers["X-Hook"] == "1"
            assert headers["X-Frame-Options"] == "DENY"
            assert "Content-Type" not in headers

        # A custom MiddlewareMixin's process_request, or the async middleware outside it,
        # answers the handshake itself, as for HTTP; the mixin's process_response then runs on
        # its own answer, and not at all on the outer layer's.
        for layer, hook_header in (("hook_request", "1"), ("async_mw", None)):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(
                    _ws(worker, "/ws/echo/"), additional_headers={"X-Short-Circuit": layer}
                ):
                    pass
            assert refused.value.response.status_code == 299
            assert refused.value.response.body == f"short-circuit by {layer}".encode()
            assert refused.value.response.headers.get("X-Hook") == hook_header

    run(main())


def test_anonymous_user_gets_the_views_403(worker):
    async def main():
        with pytest.raises(InvalidStatus) as refused:
            async with connect(_ws(worker, "/ws/whoami/")):
                pass
        assert refused.value.response.status_code == 403
        assert refused.value.response.body == b"login required"

    run(main())


def test_cross_origin_handshake_is_refused_before_the_view(worker):
    async def main():
        with pytest.raises(InvalidStatus) as refused:
            async with connect(_ws(worker, "/ws/probe/evil/"), origin="http://evil.example"):
                pass
        assert refused.value.response.status_code == 403
        same = f"http://{worker.host}:{worker.port}"
        async with connect(_ws(worker, "/ws/echo/"), origin=same) as ws:
            await ws.send("same origin")
            assert await ws.recv() == "same origin"

    run(main())
    assert "ws started evil" not in _observe(worker)["events"]


@pytest.mark.parametrize(
    ("field", "value", "status"),
    [
        ("Sec-WebSocket-Key", "not-a-key", 400),
        ("Sec-WebSocket-Version", "8", 400),
    ],
)
def test_malformed_handshake_is_refused_by_the_server(worker, field, value, status):
    fields = {
        "Host": "localhost",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    fields[field] = value
    head = "GET /ws/probe/malformed/ HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in fields.items()
    )
    with socket.create_connection((worker.host, worker.port), timeout=5) as sock:
        sock.sendall(head.encode() + b"\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert b"WebSocket" in answer
    assert "ws started malformed" not in _observe(worker)["events"]


def test_handshake_with_a_body_is_refused(worker):
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        "GET /ws/echo/ HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Content-Length: 3\r\n\r\nabc"
    )
    with socket.create_connection((worker.host, worker.port), timeout=5) as sock:
        sock.sendall(head.encode())
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"no body" in answer


def test_errors_before_and_after_accept(worker):
    async def main():
        with pytest.raises(InvalidStatus) as refused:
            async with connect(_ws(worker, "/ws/raise/before/")):
                pass
        assert refused.value.response.status_code == 500  # the project's handler500
        async with connect(_ws(worker, "/ws/raise/after/")) as ws:
            await ws.send("go")
            with pytest.raises(ConnectionClosed):
                await ws.recv()
        assert ws.close_code == 1011

    run(main())


def test_subprotocol_is_chosen_from_the_client_offer():
    with _server() as server:

        async def main():
            async with connect(_ws(server, "/ws/echo/"), subprotocols=["x.v2"]) as ws:
                assert ws.subprotocol is None  # ws_echo supports none

        run(main())


def test_sockets_hold_no_thread_and_sync_code_uses_the_pool(worker):
    # One pool thread, and a sync-only middleware in the chain: 300 open sockets must neither
    # queue behind each other nor keep the overflow threads their handshakes took.
    raise_nofile_limit(4096)

    async def main():
        sockets = [await connect(_ws(worker, f"/ws/probe/many{i}/")) for i in range(300)]
        try:
            await asyncio.gather(*(ws.send("db") for ws in sockets))
            replies = await asyncio.gather(*(ws.recv() for ws in sockets))
            assert replies == ["db 1"] * 300
            return _observe(worker)["threads"]
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))

    base = _observe(worker)["threads"]
    during = run(main())
    # Overflow threads taken by the handshakes are given back once each 101 is out; a few may
    # still be retiring, none is kept per socket.
    assert during - base < 100, (base, during)


def test_broadcast_reaches_every_socket_of_the_group(worker):
    async def main():
        a = await connect(_ws(worker, "/ws/chat/room1/"))
        b = await connect(_ws(worker, "/ws/chat/room1/"))
        other = await connect(_ws(worker, "/ws/chat/room2/"))
        for ws in (a, b, other):
            assert await ws.recv() == "joined"
        await a.send("from a")
        assert await a.recv() == "from a"
        assert await b.recv() == "from a"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(other.recv(), 0.3)
        for ws in (a, b, other):
            await ws.close()

    run(main())


def test_message_over_the_limit_closes_1009_and_ping_timeout_closes_1011():
    env = {
        "ASYNC_HANDLER_WS_MAX_MESSAGE": "1000",
        "ASYNC_HANDLER_WS_PING_INTERVAL": "0.3",
        "ASYNC_HANDLER_WS_PING_TIMEOUT": "0.3",
    }
    with _server(env=env) as server:

        async def main():
            async with connect(_ws(server, "/ws/echo/"), max_size=None) as ws:
                await ws.send("x" * 1001)
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
            assert ws.close_code == 1009

        run(main())

        # A client that never reads or answers a ping: raw socket, handshake only.
        key = base64.b64encode(os.urandom(16)).decode()
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(
                (
                    "GET /ws/echo/ HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            time.sleep(1.5)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 101 ")
        frames = data.partition(b"\r\n\r\n")[2]
        assert frames[0] == 0x89  # a ping came first
        close = frames.rindex(b"\x88")
        assert int.from_bytes(frames[close + 2 : close + 4], "big") == 1011


def test_sigterm_closes_open_sockets_with_1012():
    raise_nofile_limit(4096)
    with _server() as server:

        async def main():
            sockets = [await connect(_ws(server, "/ws/echo/")) for _ in range(500)]
            started = time.monotonic()
            os.kill(server.master_pid, signal.SIGTERM)
            codes = []
            for ws in sockets:
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)
                codes.append(ws.close_code)
            return codes, time.monotonic() - started

        codes, elapsed = run(main())
        assert server.proc is not None and server.proc.wait(10) == 0
        log = server.log_text()
    assert codes == [1012] * 500
    assert elapsed < 5  # within graceful_timeout
    # Every socket finished its closing handshake: nothing was left for the deadline to drop.
    assert "Graceful timeout" not in log
    assert "Worker exiting" in log
