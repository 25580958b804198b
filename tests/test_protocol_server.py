"""The protocol on real loopback sockets through :func:`async_handler.protocol.serve`.

Covers what a fake transport cannot: ``loop.sendfile`` (and its fallbacks under TLS and
uvloop), back-pressure against a client that does not read, a blocking sync application next
to a fast request, and disconnects.  Each test runs on asyncio and on uvloop.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from async_handler.protocol import STATS, FileWrapper, Server, serve
from async_handler.threads import ThreadPool
from tests._support import require_program

from .test_protocol import parse_responses

pytestmark = pytest.mark.server

LOOPS = ["asyncio", "uvloop"]


def run_on(loop_name: str, coro: Any, timeout: float = 20.0) -> Any:
    if loop_name == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def request(
    port: int, raw: bytes, ssl_ctx: ssl.SSLContext | None = None, read_until_close: bool = True
) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx)
    try:
        writer.write(raw)
        await writer.drain()
        return await reader.read(-1) if read_until_close else await reader.read(65536)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


def port_of(server: Server) -> int:
    port: int = server.sockets[0].getsockname()[1]
    return port


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(300_000))
    return path


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = require_program("openssl")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


class FileApp:
    """Contract app answering the file with ``wsgi.file_wrapper`` (offset 1000)."""

    async_handler_awaitable = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self.schemes: list[str] = []

    async def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        self.schemes.append(environ["wsgi.url_scheme"])
        handle = open(self.path, "rb")
        handle.seek(1000)
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](handle)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_sendfile_body(data_file: Path, loop_name: str) -> None:
    app = FileApp(data_file)
    before = dict(STATS)

    async def main() -> bytes:
        async with await serve(app, host="127.0.0.1", port=0) as server:
            raw = await request(
                port_of(server), b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
            )
        return raw

    raw = run_on(loop_name, main())
    (response,) = parse_responses(raw)
    expected = data_file.read_bytes()[1000:]
    assert response.header("Content-Length") == str(len(expected))
    assert response.body == expected
    # asyncio: loop.sendfile; uvloop (no loop.sendfile): os.sendfile driven by the protocol.
    assert STATS["sendfile_calls"] == before["sendfile_calls"] + 1
    assert STATS["sendfile_bytes"] == before["sendfile_bytes"] + len(expected)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_sendfile_falls_back_under_tls(
    data_file: Path, tls_files: tuple[Path, Path], loop_name: str
) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    client_ctx.check_hostname = False
    app = FileApp(data_file)
    before = dict(STATS)

    async def main() -> bytes:
        async with await serve(app, host="127.0.0.1", port=0, ssl=server_ctx) as server:
            return await request(
                port_of(server),
                b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
                client_ctx,
            )

    raw = run_on(loop_name, main())
    (response,) = parse_responses(raw)
    assert response.body == data_file.read_bytes()[1000:]
    assert STATS == before
    assert app.schemes == ["https"]


@pytest.mark.parametrize("loop_name", LOOPS)
def test_blocking_sync_app_does_not_stall_loop(loop_name: str) -> None:
    release = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/block":
            release.wait(10)
        start_response("200 OK", [])
        return [environ["PATH_INFO"].encode()]

    async def main() -> None:
        pool = ThreadPool(4)
        try:
            async with await serve(app, host="127.0.0.1", port=0, pool=pool) as server:
                port = port_of(server)
                blocked = asyncio.ensure_future(
                    request(port, b"GET /block HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
                )
                started = time.monotonic()
                fast = await request(
                    port, b"GET /fast HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
                )
                assert fast.endswith(b"/fast")
                assert time.monotonic() - started < 5
                assert not blocked.done()
                release.set()
                assert (await blocked).endswith(b"/block")
        finally:
            release.set()
            pool.shutdown()

    run_on(loop_name, main())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_slow_reader_holds_bounded_response(loop_name: str) -> None:
    produced: list[int] = []
    chunk = b"x" * 65536

    class App:
        async_handler_awaitable = True

        async def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            async def body() -> Any:
                for i in range(400):  # 25 MiB if nothing held it back
                    produced.append(i)
                    yield chunk

            start_response("200 OK", [])
            return body()

    async def main() -> None:
        async with await serve(App(), host="127.0.0.1", port=0) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.3)
            # socket buffers on both sides hold a few MiB at most; the rest must wait
            assert len(produced) < 200, len(produced)
            total = 0
            while not (await reader.read(1 << 20)).endswith(b"0\r\n\r\n"):
                total += 1
                assert total < 100_000
            assert len(produced) == 400
            writer.close()

    run_on(loop_name, main())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_client_disconnect_cancels_app(loop_name: str) -> None:
    events: list[str] = []
    entered = asyncio.Event()

    class App:
        async_handler_awaitable = True

        async def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            entered.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                events.append("cancelled")
                raise
            return [b""]

    async def main() -> None:
        async with await serve(App(), host="127.0.0.1", port=0) as server:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            await asyncio.wait_for(entered.wait(), 5)
            writer.transport.abort()
            deadline = time.monotonic() + 5
            while events != ["cancelled"]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)

    run_on(loop_name, main())


@pytest.mark.parametrize("loop_name", LOOPS)
def test_graceful_close_finishes_in_flight(loop_name: str) -> None:
    entered = asyncio.Event()

    class App:
        async_handler_awaitable = True

        async def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            entered.set()
            await asyncio.sleep(0.2)
            start_response("200 OK", [])
            return [b"finished"]

    async def main() -> None:
        server = await serve(App(), host="127.0.0.1", port=0)
        port = port_of(server)
        pending = asyncio.ensure_future(request(port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"))
        await asyncio.wait_for(entered.wait(), 5)
        server.close()
        await server.wait_closed(5)
        raw = await pending
        assert raw.endswith(b"finished") and b"Connection: close\r\n" in raw
        with pytest.raises(OSError):
            await request(port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")

    run_on(loop_name, main())


def test_serve_rejects_sock_and_port() -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="sock or host/port"):
            await serve(lambda e, s: [], sock=object(), port=1)  # type: ignore[arg-type]

    asyncio.run(main())


def test_file_wrapper_iterates_in_blocks(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abcdefghij")
    with open(path, "rb") as handle:
        wrapper = FileWrapper(handle, blksize=4)
        assert list(wrapper) == [b"abcd", b"efgh", b"ij"]
        wrapper.close()
        assert handle.closed



@pytest.mark.parametrize("loop_name", LOOPS)
def test_sendfile_to_slow_reader_and_early_disconnect(tmp_path: Path, loop_name: str) -> None:
    path = tmp_path / "big.bin"
    data = os.urandom(8 * 1024 * 1024)
    path.write_bytes(data)
    app = FileApp(path)

    async def main() -> None:
        async with await serve(app, host="127.0.0.1", port=0) as server:
            port = port_of(server)
            # slow reader: the server must wait for writability, not spin or corrupt
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)
            received = bytearray()
            while chunk := await reader.read(1 << 16):
                received += chunk
                if len(received) < 1 << 20:
                    await asyncio.sleep(0.001)
            writer.close()
            (response,) = parse_responses(bytes(received))
            assert response.body == data[1000:]
            # early disconnect: the connection is released, the server keeps serving
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            await reader.readexactly(1 << 20)
            writer.transport.abort()
            deadline = time.monotonic() + 5
            while server.state.connections:
                assert time.monotonic() < deadline, server.state.connections
                await asyncio.sleep(0.01)
            raw = await request(port, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            assert parse_responses(raw)[0].body == data[1000:]

    run_on(loop_name, main())
