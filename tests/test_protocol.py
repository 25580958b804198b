"""The protocol fed raw bytes through a fake transport: parsing, framing, limits, strictness.

Every request is fed whole, line by line and byte by byte where the split could matter; the
responses are parsed back with httptools' response parser.  No sockets here (see
``test_protocol_server.py`` for real sockets and ``test_protocol_gunicorn.py`` for gunicorn).
"""

from __future__ import annotations

import asyncio
import io
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httptools
import pytest

from async_handler.protocol import (
    FileWrapper,
    HttpProtocol,
    ServerConfig,
    ServerState,
)
from async_handler.threads import ThreadPool

pytestmark = pytest.mark.server

# -- harness ----------------------------------------------------------------------------------

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPool]:
    p = ThreadPool(4, name="test-protocol")
    yield p
    p.shutdown(wait=True, timeout=5)


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, TIMEOUT)

    return asyncio.run(bounded())


async def until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``cond`` on the loop until true; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.002)


class FakeTransport(asyncio.Transport):
    """Collects what the protocol writes; records pause/resume and close."""

    def __init__(
        self,
        protocol: HttpProtocol,
        peer: Any = ("127.0.0.1", 50000),
        sockname: Any = ("127.0.0.1", 8000),
        tls: bool = False,
    ) -> None:
        super().__init__()
        self.protocol = protocol
        self.out = bytearray()
        self.closed = False
        self.aborted = False
        self.reading = True
        self.eof_written = False
        self.extra: dict[str, Any] = {"peername": peer, "sockname": sockname}
        if tls:
            self.extra["sslcontext"] = object()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.eof_written, "write after write_eof"
        if not self.closed:
            self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data


def connect(
    app: Any,
    pool: ThreadPool | None,
    config: ServerConfig | None = None,
    **transport_kw: Any,
) -> tuple[HttpProtocol, FakeTransport, ServerState]:
    state = ServerState(config or ServerConfig(linger_timeout=0), pool=pool)
    proto = HttpProtocol(app, state)
    transport = FakeTransport(proto, **transport_kw)
    proto.connection_made(transport)
    return proto, transport, state


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.complete = False

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.headers} {self.body[:60]!r}>"


class _ResponseCollector:
    def __init__(self) -> None:
        self.responses: list[Response] = []
        self.current: Response | None = None
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.current = Response()
        self.responses.append(self.current)

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body += body

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.current.complete = True


def parse_responses(data: bytes, eof: bool = True) -> list[Response]:
    """Split raw response bytes into responses (HEAD/1xx-free streams only)."""
    collector = _ResponseCollector()
    collector.parser.feed_data(data)
    if eof and collector.responses and not collector.responses[-1].complete:
        # close-delimited body
        collector.parser.feed_data(b"")
    return collector.responses


def splits(data: bytes, how: str) -> list[bytes]:
    if how == "whole":
        return [data]
    if how == "lines":
        return [line for line in data.splitlines(keepends=True)]
    return [data[i : i + 1] for i in range(len(data))]


async def feed(proto: HttpProtocol, data: bytes, how: str = "whole") -> None:
    for piece in splits(data, how):
        proto.data_received(piece)
        await asyncio.sleep(0)


def text_app(body: bytes = b"ok", status: str = "200 OK") -> Callable[..., Any]:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response(status, [("Content-Type", "text/plain")])
        return [body]

    return app


class Recorder:
    """A plain WSGI app remembering each environ (and the body it read)."""

    def __init__(self, body: bytes = b"ok") -> None:
        self.environs: list[dict[str, Any]] = []
        self.bodies: list[bytes] = []
        self.body = body

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        self.environs.append(environ)
        self.bodies.append(environ["wsgi.input"].read())
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [self.body]


class SleepingApp:
    """A contract app that sleeps for 30 s and records being entered and cancelled."""

    async_handler_awaitable = True

    def __init__(self) -> None:
        self.events: list[str] = []

    async def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        self.events.append("entered")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.events.append("cancelled")
            raise
        return [b""]


class AsyncRecorder:
    """A contract app remembering each environ."""

    async_handler_awaitable = True

    def __init__(self) -> None:
        self.environs: list[dict[str, Any]] = []

    async def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        self.environs.append(environ)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"async:" + environ["PATH_INFO"].encode("latin-1")]


HOW = ["whole", "lines", "bytes"]


# -- parsing and environ ----------------------------------------------------------------------


@pytest.mark.parametrize("how", HOW)
def test_whole_environ_plain_app(pool: ThreadPool, how: str) -> None:
    app = Recorder()

    async def main() -> None:
        proto, transport, _ = connect(app, pool)
        raw = (
            b"POST /caf%C3%A9/x%2Fy?a=1&b=%20 HTTP/1.1\r\n"
            b"Host: example.com:8080\r\n"
            b"Content-Type: text/plain\r\n"
            b"Content-Length: 5\r\n"
            b"X-Multi: one\r\n"
            b"x-multi: two\r\n"
            b"X_Smuggled: dropped\r\n"
            b"User-Agent: t/1\r\n"
            b"\r\n"
            b"hello"
        )
        await feed(proto, raw, how)
        await until(lambda: b"\r\n\r\nok" in transport.out)
        assert not transport.closed

    run(main())
    (env,) = app.environs
    assert app.bodies == [b"hello"]
    assert isinstance(env.pop("wsgi.input"), io.IOBase)
    assert env.pop("wsgi.errors") is sys.stderr
    assert env == {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/caf\xc3\xa9/x/y",
        "QUERY_STRING": "a=1&b=%20",
        "RAW_URI": "/caf%C3%A9/x%2Fy?a=1&b=%20",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "50000",
        "CONTENT_TYPE": "text/plain",
        "CONTENT_LENGTH": "5",
        "HTTP_HOST": "example.com:8080",
        "HTTP_X_MULTI": "one,two",
        "HTTP_USER_AGENT": "t/1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input_terminated": True,
        "wsgi.file_wrapper": FileWrapper,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "SERVER_SOFTWARE": "async-handler",
    }


def test_whole_environ_contract_app(pool: ThreadPool) -> None:
    app = AsyncRecorder()
    config = ServerConfig(
        script_name="/mount", multiprocess=True, server_software="x/1", linger_timeout=0
    )

    async def main() -> None:
        proto, transport, state = connect(app, pool, config, tls=True)
        await feed(proto, b"GET /mount/p HTTP/1.0\r\n\r\n")
        await until(lambda: transport.closed)
        assert parse_responses(transport.take())[0].body == b"async:/p"
        env = app.environs[0]
        assert isinstance(env.pop("wsgi.input"), io.BytesIO)
        assert env.pop("wsgi.errors") is sys.stderr
        assert env.pop("async_handler.thread_pool") is state.pool
        assert env == {
            "REQUEST_METHOD": "GET",
            "SCRIPT_NAME": "/mount",
            "PATH_INFO": "/p",
            "QUERY_STRING": "",
            "RAW_URI": "/mount/p",
            "SERVER_PROTOCOL": "HTTP/1.0",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8000",
            "REMOTE_ADDR": "127.0.0.1",
            "REMOTE_PORT": "50000",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https",
            "wsgi.input_terminated": True,
            "wsgi.file_wrapper": FileWrapper,
            "wsgi.multithread": True,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "SERVER_SOFTWARE": "x/1",
            "async_handler.async": True,
        }

    run(main())


def test_unix_socket_server_name_from_host(pool: ThreadPool) -> None:
    app = Recorder()

    async def main() -> None:
        proto, _transport, _ = connect(app, pool, peer="", sockname="/tmp/s.sock")
        await feed(proto, b"GET / HTTP/1.1\r\nHost: [::1]:9000\r\n\r\n")
        await feed(proto, b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n")
        await until(lambda: len(app.environs) == 2)

    run(main())
    first, second = app.environs
    assert (first["SERVER_NAME"], first["SERVER_PORT"]) == ("[::1]", "9000")
    assert (second["SERVER_NAME"], second["SERVER_PORT"]) == ("example.org", "80")
    assert first["REMOTE_ADDR"] == ""
    assert "REMOTE_PORT" not in first


def test_absolute_form_target(pool: ThreadPool) -> None:
    app = Recorder()

    async def main() -> None:
        proto, _transport, _ = connect(app, pool)
        await feed(proto, b"GET http://other.example/p/q?x=1#frag HTTP/1.1\r\nHost: h\r\n\r\n")
        await until(lambda: len(app.environs) == 1)

    run(main())
    env = app.environs[0]
    assert (env["PATH_INFO"], env["QUERY_STRING"]) == ("/p/q", "x=1")
    assert env["RAW_URI"] == "http://other.example/p/q?x=1#frag"


def test_fragment_and_empty_query(pool: ThreadPool) -> None:
    app = Recorder()

    async def main() -> None:
        proto, _, _ = connect(app, pool)
        await feed(proto, b"GET /a?#f HTTP/1.1\r\nHost: h\r\n\r\n")
        await until(lambda: len(app.environs) == 1)

    run(main())
    assert (app.environs[0]["PATH_INFO"], app.environs[0]["QUERY_STRING"]) == ("/a", "")


@pytest.mark.parametrize(
    ("peer", "headers", "scheme"),
    [
        ("127.0.0.1", b"X-Forwarded-Proto: https\r\n", "https"),
        ("10.1.2.3", b"X-Forwarded-Proto: https\r\n", "http"),  # untrusted peer: ignored
        ("127.0.0.1", b"X-Forwarded-Proto: http\r\n", "http"),
        ("127.0.0.1", b"X-Forwarded-Ssl: on\r\nX-Forwarded-Proto: https\r\n", "https"),
    ],
)
def test_secure_scheme_headers(pool: ThreadPool, peer: str, headers: bytes, scheme: str) -> None:
    app = Recorder()

    async def main() -> None:
        proto, _, _ = connect(app, pool, peer=(peer, 1234))
        await feed(proto, b"GET / HTTP/1.1\r\nHost: h\r\n" + headers + b"\r\n")
        await until(lambda: len(app.environs) == 1)

    run(main())
    assert app.environs[0]["wsgi.url_scheme"] == scheme


def test_forwarded_allow_ips_network_and_star(pool: ThreadPool) -> None:
    for allowed, expected in ((("10.0.0.0/8",), "https"), (("*",), "https"), ((), "http")):
        app = Recorder()
        config = ServerConfig(forwarded_allow_ips=allowed, linger_timeout=0)

        async def main(app: Recorder = app, config: ServerConfig = config) -> None:
            proto, _, _ = connect(app, pool, config, peer=("10.9.9.9", 1))
            await feed(proto, b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: https\r\n\r\n")
            await until(lambda: len(app.environs) == 1)

        run(main())
        assert app.environs[0]["wsgi.url_scheme"] == expected, allowed


# -- keep-alive and pipelining ----------------------------------------------------------------


@pytest.mark.parametrize("how", HOW)
def test_keepalive_and_pipelining_in_order(pool: ThreadPool, how: str) -> None:
    order: list[str] = []

    class Slow:
        async_handler_awaitable = True

        async def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
            path = environ["PATH_INFO"]
            order.append(path)
            if path == "/1":
                await asyncio.sleep(0.05)  # the first answer is the slowest
            start_response("200 OK", [])
            return [path.encode()]

    async def main() -> None:
        proto, transport, _ = connect(Slow(), pool)
        raw = b"".join(
            b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in (1, 2, 3)
        )
        await feed(proto, raw, how)
        await until(lambda: len(parse_responses(bytes(transport.out), eof=False)) == 3)
        responses = parse_responses(transport.take(), eof=False)
        assert [r.body for r in responses] == [b"/1", b"/2", b"/3"]
        assert all(r.header("Connection") is None for r in responses)
        assert not transport.closed
        # the connection serves more requests afterwards
        await feed(proto, b"GET /4 HTTP/1.1\r\nHost: h\r\n\r\n", how)
        await until(lambda: b"/4" in transport.out)

    run(main())
    assert order == ["/1", "/2", "/3", "/4"]


def test_pipelining_pauses_reading(pool: ThreadPool) -> None:
    release = asyncio.Event()

    class Blocked:
        async_handler_awaitable = True

        async def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
            await release.wait()
            start_response("200 OK", [])
            return [b"x"]

    async def main() -> None:
        proto, transport, _ = connect(Blocked(), pool)
        await feed(proto, b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
        await asyncio.sleep(0)
        assert transport.reading  # one request in flight: still reading (to see disconnects)
        await feed(proto, b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
        assert not transport.reading  # a second is waiting: parse no further
        release.set()
        await until(lambda: transport.out.count(b"HTTP/1.1 200") == 2)
        await until(lambda: transport.reading)

    run(main())


def test_idle_keepalive_timeout_closes(pool: ThreadPool) -> None:
    async def main() -> None:
        config = ServerConfig(keepalive=0.5, linger_timeout=0)
        proto, transport, _ = connect(text_app(), pool, config)
        await feed(proto, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await until(lambda: b"ok" in transport.out)
        assert not transport.closed
        await until(lambda: transport.closed, timeout=2)

    run(main())


def test_keepalive_zero_closes_every_response(pool: ThreadPool) -> None:
    async def main() -> None:
        config = ServerConfig(keepalive=0, linger_timeout=0)
        proto, transport, _ = connect(text_app(), pool, config)
        await feed(proto, b"GET / HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
        await until(lambda: transport.closed)
        (response,) = parse_responses(transport.take())
        assert response.header("Connection") == "close"

    run(main())


def test_connection_close_request_stops_pipeline(pool: ThreadPool) -> None:
    app = Recorder()

    async def main() -> None:
        proto, transport, _ = connect(app, pool)
        await feed(
            proto,
            b"GET /1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
            b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n",
        )
        await until(lambda: transport.closed)
        (response,) = parse_responses(transport.take())
        assert response.header("Connection") == "close"

    run(main())
    assert [e["PATH_INFO"] for e in app.environs] == ["/1"]


def test_http10_default_close_and_keepalive(pool: ThreadPool) -> None:
    async def main() -> None:
        proto, transport, _ = connect(text_app(), pool)
        await feed(proto, b"GET / HTTP/1.0\r\n\r\n")
        await until(lambda: transport.closed)
        (r,) = parse_responses(transport.take())
        assert (r.header("Connection"), r.header("Content-Length"), r.body) == ("close", "2", b"ok")

        proto, transport, _ = connect(text_app(), pool)
        await feed(proto, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        await until(lambda: b"ok" in transport.out)
        (r,) = parse_responses(transport.take(), eof=False)
        assert r.header("Connection") == "keep-alive"
        assert not transport.closed

    run(main())


def test_http10_streaming_is_close_delimited(pool: ThreadPool) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"a"
        yield b"b"

    async def main() -> None:
        proto, transport, _ = connect(app, pool)
        await feed(proto, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        await until(lambda: transport.closed)
        raw = transport.take()
        assert b"Transfer-Encoding" not in raw and b"Content-Length" not in raw
        assert b"Connection: close\r\n" in raw
        assert raw.endswith(b"\r\n\r\nab")

    run(main())


# -- request bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", HOW)
def test_chunked_body_dechunked(pool: ThreadPool, how: str) -> None:
    app = Recorder()

    async def main() -> None:
        proto, _transport, _ = connect(app, pool)
        raw = (
            b"POST /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
            b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        await feed(proto, raw, how)
        await until(lambda: len(app.environs) == 2)

    run(main())
    assert app.bodies == [b"hello world", b""]
    env = app.environs[0]
    assert env["CONTENT_LENGTH"] == "11"
    assert "HTTP_X_TRAILER" not in env
    assert app.environs[1]["PATH_INFO"] == "/next"


@pytest.mark.parametrize("field", [b"Host", b"authorization", b"Trailer", b"TE"])
def test_forbidden_trailer_field_refused(pool: ThreadPool, field: bytes) -> None:
    """RFC 9110 section 6.5.1: a trailer must not carry framing, routing or authentication."""
    app = Recorder()

    async def main() -> bytes:
        proto, transport, _ = connect(app, pool)
        raw = (
            b"POST /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n" + field + b": evil.example\r\n\r\n"
        )
        proto.data_received(raw)
        await until(lambda: transport.closed)
        return transport.take()

    raw = run(main())
    assert raw.startswith(b"HTTP/1.1 400 "), raw
    assert b"forbidden" in raw
    assert app.environs == []


def test_large_body_spooled_to_disk(pool: ThreadPool) -> None:
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        stream = environ["wsgi.input"]
        seen["pos"] = stream.tell()
        seen["disk"] = not isinstance(stream, io.BytesIO)
        seen["body"] = stream.read()
        start_response("200 OK", [])
        return [b""]

    body = bytes(range(256)) * 64  # 16 KiB
    config = ServerConfig(spool_threshold=1000, linger_timeout=0)

    async def main() -> None:
        proto, transport, _ = connect(app, pool, config)
        head = b"PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body)
        await feed(proto, head)
        for i in range(0, len(body), 1000):
            proto.data_received(body[i : i + 1000])
        await until(lambda: b"200 OK" in transport.out)

    run(main())
    assert seen == {"pos": 0, "disk": True, "body": body}


def test_expect_100_continue(pool: ThreadPool) -> None:
    app = Recorder()

    async def main() -> None:
        proto, transport, _ = connect(app, pool)
        await feed(
            proto,
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
        )
        assert transport.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
        await feed(proto, b"abc")
        await until(lambda: b"200 OK" in transport.out)
        assert b"100 Continue" not in transport.out

    run(main())
    assert app.bodies == [b"abc"]


def test_expect_100_continue_not_sent_before_413(pool: ThreadPool) -> None:
    app = Recorder()
    config = ServerConfig(max_body_size=10, linger_timeout=0)

    async def main() -> None:
        proto, transport, _ = connect(app, pool, config)
        await feed(
            proto,
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n",
        )
        await until(lambda: transport.closed)
        raw = transport.take()
        assert raw.startswith(b"HTTP/1.1 413 ")
        assert b"100 Continue" not in raw

    run(main())
    assert app.environs == []


def test_expect_100_continue_waits_for_its_turn(pool: ThreadPool) -> None:
    release = asyncio.Event()

    class App:
        async_handler_awaitable = True

        async def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
            if environ["PATH_INFO"] == "/slow":
                await release.wait()
            start_response("200 OK", [])
            return [environ["wsgi.input"].read() or b"-"]

    async def main() -> None:
        proto, transport, _ = connect(App(), pool)
        await feed(
            proto,
            b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n"
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n",
        )
        await asyncio.sleep(0.01)
        assert transport.out == b""  # no 100 Continue ahead of the first response
        release.set()
        await until(lambda: b"100 Continue" in transport.out)
        first = bytes(transport.out)
        assert first.index(b"200 OK") < first.index(b"100 Continue")
        await feed(proto, b"xy")
        await until(lambda: transport.out.endswith(b"xy"))

    run(main())


def test_expect_unknown_is_417(pool: ThreadPool) -> None:
    assert_refused(pool, b"GET / HTTP/1.1\r\nHost: h\r\nExpect: magic\r\n\r\n", 417, b"magic")


# -- strictness: refused requests ---------------------------------------------------------------

PIPELINED = b"GET /behind HTTP/1.1\r\nHost: h\r\n\r\n"


def assert_refused(
    pool: ThreadPool,
    raw: bytes,
    status: int,
    reason: bytes,
    config: ServerConfig | None = None,
    how: str = "whole",
) -> None:
    """The request is answered ``status`` with ``reason`` in a text body, ``Connection:
    close``; the app is never called; the request pipelined behind it is not processed."""
    app = Recorder()

    async def main() -> None:
        proto, transport, _ = connect(app, pool, config)
        await feed(proto, raw + PIPELINED, how)
        await until(lambda: transport.closed, what="connection closed")
        responses = parse_responses(transport.take())
        assert len(responses) == 1, responses
        (r,) = responses
        assert r.status == status, r
        assert r.header("Connection") == "close"
        assert r.header("Content-Type") == "text/plain; charset=utf-8"
        assert reason in r.body, r.body

    run(main())
    assert app.environs == []


@pytest.mark.parametrize("how", ["whole", "bytes"])
@pytest.mark.parametrize(
    ("raw", "status", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400, b"Missing Host"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, b"More than one Host"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400, b"More than one Host"),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            400,
            b"Content-Length",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy",
            400,
            b"Content-Length",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            b"Content-Length",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 3\r\n\r\n0\r\n\r\n",
            400,
            b"Content-Length",
        ),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 400, b"chunked"),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            400,
            b"Transfer-Encoding",
        ),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: foo\r\n\r\n", 501, b"'foo'"),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: foo, chunked\r\n\r\n0\r\n\r\n",
            501,
            b"'foo'",
        ),
        (
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            b"HTTP/1.0",
        ),
        (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505, b"2.0"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Type: a\r\nContent-Type: b\r\n\r\n", 400,
         b"Content-Type"),
        (b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n", 400, b"Malformed"),
        (b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400, b"request line"),
        (b"GET /  HTTP/1.1\r\nHost: h\r\n\r\n", 400, b""),
        (b"GET /\x7f HTTP/1.1\r\nHost: h\r\n\r\n", 400, b"target"),
        (b"G@T / HTTP/1.1\r\nHost: h\r\n\r\n", 400, b"method"),
        (b"GET / HTTP/1.1\nHost: h\n\n", 400, b"Malformed"),
        (b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n", 400, b"Malformed"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nBad Name: v\r\n\r\n", 400, b"Malformed"),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400, b"Malformed"),
        (
            b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-Ssl: off\r\n\r\n",
            400,
            b"Contradictory scheme",
        ),
    ],
)
def test_strictness_refusals(
    pool: ThreadPool, raw: bytes, status: int, reason: bytes, how: str
) -> None:
    assert_refused(pool, raw, status, reason, how=how)


def test_refusal_after_good_request_keeps_order(pool: ThreadPool) -> None:
    app = Recorder()

    async def main() -> None:
        proto, transport, _ = connect(app, pool)
        await feed(proto, b"GET /ok HTTP/1.1\r\nHost: h\r\n\r\nGET / HTTP/1.1\r\n\r\n" + PIPELINED)
        await until(lambda: transport.closed)
        ok, bad = parse_responses(transport.take())
        assert (ok.status, ok.body, ok.header("Connection")) == (200, b"ok", None)
        assert (bad.status, bad.header("Connection")) == (400, "close")

    run(main())
    assert [e["PATH_INFO"] for e in app.environs] == ["/ok"]


def test_script_name_mismatch_refused(pool: ThreadPool) -> None:
    config = ServerConfig(script_name="/app", linger_timeout=0)
    assert_refused(pool, b"GET /application HTTP/1.1\r\nHost: h\r\n\r\n", 404, b"SCRIPT_NAME",
                   config)


# -- limits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["whole", "bytes"])
def test_limit_request_line_414(pool: ThreadPool, how: str) -> None:
    config = ServerConfig(limit_request_line=100, linger_timeout=0)
    raw = b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    assert_refused(pool, raw, 414, b"100 bytes", config, how)
    ok = b"GET /" + b"a" * 80 + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    app = Recorder()

    async def main() -> None:
        proto, transport, _ = connect(app, pool, config)
        await feed(proto, ok)
        await until(lambda: b"200 OK" in transport.out)

    run(main())


def test_limit_request_fields_431(pool: ThreadPool) -> None:
    config = ServerConfig(limit_request_fields=5, linger_timeout=0)
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(5))
    assert_refused(pool, b"GET / HTTP/1.1\r\nHost: h\r\n" + fields + b"\r\n", 431, b"5 header",
                   config)


@pytest.mark.parametrize("how", ["whole", "lines"])
def test_limit_request_field_size_431(pool: ThreadPool, how: str) -> None:
    config = ServerConfig(limit_request_field_size=50, linger_timeout=0)
    raw = b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"v" * 50 + b"\r\n\r\n"
    assert_refused(pool, raw, 431, b"50 bytes", config, how)


def test_unterminated_header_is_bounded(pool: ThreadPool) -> None:
    """A field that never ends is refused once the head exceeds its bound (no OOM)."""
    config = ServerConfig(limit_request_fields=2, limit_request_field_size=100, linger_timeout=0)
    app = Recorder()

    async def main() -> None:
        proto, transport, _ = connect(app, pool, config)
        proto.data_received(b"GET / HTTP/1.1\r\nHost: h\r\nX: ")
        for _ in range(100):
            proto.data_received(b"v" * 4096)
            if transport.closed:
                break
        await until(lambda: transport.closed)
        assert transport.take().startswith(b"HTTP/1.1 431 ")

    run(main())
    assert app.environs == []


def test_max_body_size_content_length_413(pool: ThreadPool) -> None:
    config = ServerConfig(max_body_size=10, linger_timeout=0)
    raw = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n"
    assert_refused(pool, raw, 413, b"limit of 10 bytes", config)


@pytest.mark.parametrize("how", ["whole", "bytes"])
def test_max_body_size_chunked_413(pool: ThreadPool, how: str) -> None:
    config = ServerConfig(max_body_size=10, linger_timeout=0)
    raw = (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\naaaaaa\r\n6\r\nbbbbbb\r\n0\r\n\r\n"
    )
    assert_refused(pool, raw, 413, b"larger than 10 bytes", config, how)


def test_header_timeout_408_and_silent_close(pool: ThreadPool) -> None:
    config = ServerConfig(header_timeout=0.05, linger_timeout=0)

    async def main() -> None:
        proto, transport, _ = connect(text_app(), pool, config)
        await feed(proto, b"GET / HTTP/1.1\r\nHost")
        await until(lambda: transport.closed, timeout=2)
        assert transport.take().startswith(b"HTTP/1.1 408 ")
        # a connection that never sends anything is closed without an answer
        proto, transport, _ = connect(text_app(), pool, config)
        await until(lambda: transport.closed, timeout=2)
        assert transport.take() == b""

    run(main())


def test_body_inactivity_timeout_408(pool: ThreadPool) -> None:
    config = ServerConfig(header_timeout=0.5, linger_timeout=0)
    app = Recorder()

    async def main() -> None:
        proto, transport, _ = connect(app, pool, config)
        await feed(proto, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n")
        for _ in range(4):  # a body trickling in faster than the timeout is fine
            await asyncio.sleep(0.05)
            proto.data_received(b"a")
        assert not transport.closed
        await until(lambda: transport.closed, timeout=2)
        assert transport.take().startswith(b"HTTP/1.1 408 ")

    run(main())
    assert app.environs == []


def test_asterisk_form_only_for_options(pool: ThreadPool) -> None:
    assert_refused(pool, b"GET * HTTP/1.1\r\nHost: h\r\n\r\n", 400, b"OPTIONS")
    app = Recorder()

    async def main() -> None:
        proto, transport, _ = connect(app, pool)
        await feed(proto, b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n")
        await until(lambda: b"200 OK" in transport.out)

    run(main())
    assert app.environs[0]["PATH_INFO"] == "*"


def test_lingering_close_after_refusal(pool: ThreadPool) -> None:
    config = ServerConfig(linger_timeout=0.5)

    async def main() -> None:
        proto, transport, _ = connect(text_app(), pool, config)
        await feed(proto, b"GET / HTTP/1.1\r\n\r\n")
        await until(lambda: transport.eof_written)
        assert not transport.closed and transport.reading  # draining the client's input
        proto.data_received(b"more garbage the client sent")  # discarded
        await until(lambda: transport.closed, timeout=2)
        assert transport.take().count(b"HTTP/1.1 400") == 1

    run(main())


# -- response framing -----------------------------------------------------------------------------


def framing_app(environ: dict[str, Any], start_response: Any) -> Any:
    path = environ["PATH_INFO"]
    if path == "/list":
        start_response("200 OK", [("X", "1")])
        return [b"ab", b"cd"]
    if path == "/gen":
        start_response("200 OK", [])
        return iter([b"ab", b"", b"cd"])
    if path == "/cl":
        start_response("200 OK", [("Content-Length", "4")])
        return iter([b"ab", b"cdEXTRA"])
    if path == "/204":
        start_response("204 No Content", [("Content-Length", "5")])
        return [b"hello"]
    if path == "/304":
        start_response("304 Not Modified", [("Content-Length", "5"), ("ETag", '"x"')])
        return [b""]
    if path == "/empty":
        start_response("200 OK", [])
        return iter([])
    if path == "/hop":
        start_response(
            "200 OK", [("Transfer-Encoding", "chunked"), ("Keep-Alive", "x"), ("Date", "d")]
        )
        return [b"x"]
    raise AssertionError(path)


def get(pool: ThreadPool, target: str, method: str = "GET", app: Any = framing_app) -> bytes:
    async def main() -> bytes:
        proto, transport, _ = connect(app, pool)
        await feed(proto, f"{method} {target} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        await until(lambda: b"\r\n\r\n" in transport.out and not proto._cycles)
        return transport.take()

    result: bytes = run(main())
    return result


def test_list_body_gets_content_length_in_one_write(pool: ThreadPool) -> None:
    writes: list[bytes] = []

    async def main() -> None:
        proto, transport, _ = connect(framing_app, pool)
        original = transport.write
        transport.write = lambda data: (writes.append(bytes(data)), original(data))  # type: ignore[method-assign,assignment,func-returns-value]
        await feed(proto, b"GET /list HTTP/1.1\r\nHost: h\r\n\r\n")
        await until(lambda: not proto._cycles)

    run(main())
    assert len(writes) == 1
    head, body = writes[0].split(b"\r\n\r\n")
    assert body == b"abcd"
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert b"Content-Length: 4" in lines and b"X: 1" in lines
    assert any(line.startswith(b"Date: ") for line in lines)


def test_framing_variants(pool: ThreadPool) -> None:
    raw = get(pool, "/gen")
    assert b"Transfer-Encoding: chunked\r\n" in raw
    assert raw.endswith(b"\r\n\r\n2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n")
    (r,) = parse_responses(get(pool, "/gen"), eof=False)
    assert r.body == b"abcd"

    raw = get(pool, "/cl")
    assert raw.endswith(b"Content-Length: 4\r\n\r\nabcd")  # truncated to the announced length

    raw = get(pool, "/empty")
    assert raw.endswith(b"Content-Length: 0\r\n\r\n")

    raw = get(pool, "/204")
    assert b"Content-Length" not in raw and raw.endswith(b"\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 204 No Content\r\n")

    raw = get(pool, "/304")
    assert b"Content-Length: 5\r\n" in raw and raw.endswith(b"\r\n\r\n")

    raw = get(pool, "/hop")
    assert b"Keep-Alive" not in raw and b"Date: d\r\n" in raw
    assert raw.count(b"Date:") == 1
    assert raw.endswith(b"Content-Length: 1\r\n\r\nx")


def test_head_has_no_body_but_keeps_length(pool: ThreadPool) -> None:
    raw = get(pool, "/list", "HEAD")
    assert raw.endswith(b"Content-Length: 4\r\n\r\n")
    raw = get(pool, "/gen", "HEAD")
    assert raw.endswith(b"\r\n\r\n") and b"Transfer-Encoding" not in raw
    raw = get(pool, "/cl", "HEAD")
    assert raw.endswith(b"Content-Length: 4\r\n\r\n")


def test_app_connection_close_header(pool: ThreadPool) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Connection", "close")])
        return [b"bye"]

    async def main() -> None:
        proto, transport, _ = connect(app, pool)
        await feed(proto, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await until(lambda: transport.closed)
        assert transport.take().count(b"Connection: close") == 1

    run(main())


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        ("200 OK", [("X-Evil", "a\r\nSet-Cookie: b")]),
        ("200 OK", [("X-Evil", "a\nb")]),
        ("200 OK", [("X-Evil", "a\x00b")]),
        ("200 OK", [("X Evil", "a")]),
        ("200 OK", [("X:Evil", "a")]),
        ("200 OK", [("X\r\nEvil", "a")]),
        ("200 OK\r\nX: y", []),
        ("2000 OK", []),
        ("OK", []),
        ("200 OK", [("X", 1)]),
        ("200 OK", [("X", "snow\u2603")]),
        ("200 OK", [("Content-Length", "x")]),
        ("200 OK", [("Content-Length", "4"), ("content-length", "4")]),
        ("200 OK", [("Content-Length", "\uff14")]),  # a digit, but not ASCII
        ("200 OK", [["X-Evil", "a\r\nb"]]),  # a list, not a tuple
    ],
)
@pytest.mark.parametrize("swallow", [False, True])
def test_invalid_response_head_never_written(
    pool: ThreadPool, status: str, headers: list[tuple[str, Any]], swallow: bool
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        try:
            start_response(status, headers)
        except (ValueError, TypeError):
            if not swallow:
                raise
        return [b"body"]

    async def main() -> None:
        proto, transport, _ = connect(app, pool)
        await feed(proto, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n" + PIPELINED)
        await until(lambda: transport.closed)
        raw = transport.take()
        assert raw.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
        assert b"Evil" not in raw and b"body" not in raw and raw.count(b"HTTP/1.1") == 1

    run(main())


def test_a_valid_field_seen_before_does_not_vouch_for_a_variant(pool: ThreadPool) -> None:
    # start_response caches validated fields by (name, value): only exact repeats may skip the
    # checks.
    fields = [[("X-Probe", "ok")], [("X-Probe", "ok\r\nX-Evil: 1")], [("X-Probe", "ok")]]

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", fields.pop(0))
        return [b"body"]

    assert get(pool, "/", app=app).startswith(b"HTTP/1.1 200 OK\r\n")
    refused = get(pool, "/", app=app)
    assert refused.startswith(b"HTTP/1.1 500 ") and b"Evil" not in refused
    assert b"X-Probe: ok\r\n" in get(pool, "/", app=app)


def test_app_exception_is_500(pool: ThreadPool) -> None:
    class Boom:
        async_handler_awaitable = True

        async def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
            raise RuntimeError("boom")

    def boom(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise RuntimeError("boom")

    def no_start(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        return [b"x"]

    for app in (Boom(), boom, no_start):
        raw = get(pool, "/", app=app)
        assert raw.startswith(b"HTTP/1.1 500 "), app


def test_error_after_headers_sent_closes(pool: ThreadPool) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"partial"
        raise RuntimeError("late")

    async def main() -> None:
        proto, transport, _ = connect(app, pool)
        await feed(proto, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await until(lambda: transport.closed)
        raw = transport.take()
        assert b"partial" in raw and not raw.endswith(b"0\r\n\r\n")

    run(main())


# -- PEP 3333 callables -------------------------------------------------------------------------


def test_write_callable_from_thread(pool: ThreadPool) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [])
        write(b"first;")
        write(b"second;")
        return [b"last"]

    (r,) = parse_responses(get(pool, "/", app=app), eof=False)
    assert r.body == b"first;second;last"
    assert r.header("Transfer-Encoding") == "chunked"


def test_write_callable_from_contract_app(pool: ThreadPool) -> None:
    class App:
        async_handler_awaitable = True

        async def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
            write = start_response("200 OK", [("Content-Length", "6")])
            write(b"abc")
            return [b"def"]

    raw = get(pool, "/", app=App())
    assert raw.endswith(b"Content-Length: 6\r\n\r\nabcdef")


def test_exc_info_semantics(pool: ThreadPool) -> None:
    def replaces(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("X", "1")])
        try:
            raise ValueError("oops")
        except ValueError:
            start_response("500 Oops", [("X", "2")], sys.exc_info())
        return [b"err"]

    raw = get(pool, "/", app=replaces)
    assert raw.startswith(b"HTTP/1.1 500 Oops\r\n") and b"X: 2\r\n" in raw

    def twice(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        start_response("200 OK", [])
        return [b""]

    assert get(pool, "/", app=twice).startswith(b"HTTP/1.1 500 ")

    reraised: list[BaseException] = []

    def after_sent(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"sent"
        try:
            raise KeyError("late")
        except KeyError:
            try:
                start_response("500 X", [], sys.exc_info())
            except KeyError as exc:
                reraised.append(exc)
        yield b"!"

    raw = get(pool, "/", app=after_sent)
    assert raw.startswith(b"HTTP/1.1 200 OK") and len(reraised) == 1


def test_sync_app_runs_off_loop_and_closes_body(pool: ThreadPool) -> None:
    threads: list[int] = []
    closed: list[int] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            threads.append(threading.get_ident())
            yield b"x"

        def close(self) -> None:
            closed.append(threading.get_ident())

    def app(environ: dict[str, Any], start_response: Any) -> Body:
        threads.append(threading.get_ident())
        start_response("200 OK", [])
        return Body()

    get(pool, "/", app=app)
    main = threading.get_ident()
    assert len(threads) == 2 and main not in threads
    assert len(set(threads)) == 1  # one lease: same thread for the call and the iteration
    assert closed and closed[0] != main


def test_async_iterable_body_and_aclose(pool: ThreadPool) -> None:
    events: list[str] = []

    class Body:
        def __init__(self) -> None:
            self.items = [b"a", b"b"]

        def __aiter__(self) -> Body:
            return self

        async def __anext__(self) -> bytes:
            if not self.items:
                raise StopAsyncIteration
            return self.items.pop(0)

        async def aclose(self) -> None:
            events.append("aclose")

        def close(self) -> None:
            events.append("close")

    class App:
        async_handler_awaitable = True

        async def __call__(self, environ: dict[str, Any], start_response: Any) -> Body:
            start_response("200 OK", [])
            return Body()

    (r,) = parse_responses(get(pool, "/", app=App()), eof=False)
    assert r.body == b"ab"
    assert events == ["aclose"]


def test_contract_sync_iterable_pulled_off_loop(pool: ThreadPool) -> None:
    threads: list[int] = []

    def gen() -> Iterator[bytes]:
        threads.append(threading.get_ident())
        yield b"g"

    class App:
        async_handler_awaitable = True

        async def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            start_response("200 OK", [])
            return gen()

    get(pool, "/", app=App())
    assert threads and threads[0] != threading.get_ident()


def test_file_wrapper_fallback_for_non_files(pool: ThreadPool) -> None:
    wrapper_closed: list[bool] = []

    class App:
        async_handler_awaitable = True

        async def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            start_response("200 OK", [])
            stream = io.BytesIO(b"x" * 20000)
            wrapper = environ["wsgi.file_wrapper"](stream, 4096)
            assert (wrapper.filelike, wrapper.blksize) == (stream, 4096)

            async def aclose() -> None:
                wrapper_closed.append(True)

            wrapper.aclose = aclose  # the contract lets an app attach aclose
            return wrapper

    (r,) = parse_responses(get(pool, "/", app=App()), eof=False)
    assert r.body == b"x" * 20000
    assert wrapper_closed == [True]


# -- cancellation, timeouts, back-pressure, hooks -----------------------------------------------


def test_disconnect_cancels_async_app(pool: ThreadPool) -> None:
    app = SleepingApp()
    events = app.events

    async def main() -> None:
        proto, _transport, state = connect(app, pool)
        await feed(proto, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await until(lambda: events == ["entered"])
        proto.connection_lost(None)
        await until(lambda: events == ["entered", "cancelled"])
        assert proto not in state.connections

    run(main())


def test_disconnect_during_streaming_closes_body(pool: ThreadPool) -> None:
    events: list[str] = []

    async def body() -> Any:
        try:
            yield b"first"
            await asyncio.sleep(30)
            yield b"never"
        finally:
            events.append("finally")

    class App:
        async_handler_awaitable = True

        async def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            start_response("200 OK", [])
            return body()

    async def main() -> None:
        proto, transport, _ = connect(App(), pool)
        await feed(proto, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await until(lambda: b"first" in transport.out)
        transport.close()
        await until(lambda: events == ["finally"])

    run(main())


def test_disconnect_while_the_body_closes_lets_the_close_finish(pool: ThreadPool) -> None:
    events: list[str] = []
    closing = asyncio.Event()

    class Body:
        def __iter__(self) -> Any:
            return iter([b"done"])

        async def aclose(self) -> None:
            closing.set()
            try:
                await asyncio.sleep(0.2)  # say, request_finished's receivers on a thread
            except asyncio.CancelledError:
                events.append("cancelled")
                raise
            events.append("closed")

    class App:
        async_handler_awaitable = True

        async def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            start_response("200 OK", [("Content-Length", "4")])
            return Body()

    async def main() -> None:
        proto, _transport, state = connect(App(), pool)
        await feed(proto, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await closing.wait()
        proto.connection_lost(None)
        await until(lambda: events == ["closed"])
        assert proto not in state.connections

    run(main())


def test_request_timeout_503(pool: ThreadPool) -> None:
    events: list[str] = []
    ends: list[tuple[str, int]] = []

    class App:
        async_handler_awaitable = True

        async def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                events.append("cancelled")
                raise
            return [b""]

    async def main() -> None:
        config = ServerConfig(request_timeout=0.05, linger_timeout=0)
        state = ServerState(
            config, pool=pool, on_request_end=lambda e, s, h, n, d: ends.append((s, n))
        )
        proto = HttpProtocol(App(), state)
        transport = FakeTransport(proto)
        proto.connection_made(transport)
        await feed(proto, b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
        await until(lambda: transport.closed, timeout=3)
        (r,) = parse_responses(transport.take())
        assert r.status == 503 and b"timed out" in r.body

    run(main())
    assert events == ["cancelled"]
    assert ends == [("503 Service Unavailable", len(b"Request timed out\n"))]


def test_backpressure_pauses_body_iteration(pool: ThreadPool) -> None:
    produced: list[int] = []

    async def body() -> Any:
        for i in range(5):
            produced.append(i)
            yield b"%d" % i

    class App:
        async_handler_awaitable = True

        async def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            start_response("200 OK", [])
            return body()

    async def main() -> None:
        proto, transport, _ = connect(App(), pool)
        proto.pause_writing()
        await feed(proto, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await asyncio.sleep(0.02)
        assert produced == [0]  # the first chunk went out; the sender waits in drain()
        proto.resume_writing()
        await until(lambda: transport.out.endswith(b"0\r\n\r\n"))
        assert produced == [0, 1, 2, 3, 4]

    run(main())


def test_backpressure_blocks_sync_write(pool: ThreadPool) -> None:
    progress: list[int] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", [])
        for i in range(3):
            write(b"x")
            progress.append(i)
        return []

    async def main() -> None:
        proto, _transport, _ = connect(app, pool)
        proto.pause_writing()
        await feed(proto, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await asyncio.sleep(0.05)
        assert progress == []  # the app's thread is blocked in write()
        proto.resume_writing()
        await until(lambda: progress == [0, 1, 2])

    run(main())


def test_hooks_called(pool: ThreadPool) -> None:
    starts: list[str] = []
    ends: list[tuple[str, str, list[tuple[str, str]], int]] = []

    async def main() -> None:
        state = ServerState(
            ServerConfig(linger_timeout=0),
            pool=pool,
            on_request_start=lambda env: starts.append(env["PATH_INFO"]),
            on_request_end=lambda env, status, headers, sent, dur: ends.append(
                (env["PATH_INFO"], status, headers, sent)
            ),
        )
        proto = HttpProtocol(text_app(b"hello"), state)
        transport = FakeTransport(proto)
        proto.connection_made(transport)
        await feed(proto, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nHEAD /b HTTP/1.1\r\nHost: h\r\n\r\n")
        await until(lambda: len(ends) == 2)
        assert state.total_requests == 2

    run(main())
    assert starts == ["/a", "/b"]
    assert ends == [
        ("/a", "200 OK", [("Content-Type", "text/plain")], 5),
        ("/b", "200 OK", [("Content-Type", "text/plain")], 0),
    ]


def test_pre_request_hook_failure_is_500(pool: ThreadPool) -> None:
    def fail(environ: dict[str, Any]) -> None:
        raise RuntimeError("hook")

    async def main() -> None:
        state = ServerState(ServerConfig(linger_timeout=0), pool=pool, on_request_start=fail)
        proto = HttpProtocol(text_app(), state)
        transport = FakeTransport(proto)
        proto.connection_made(transport)
        await feed(proto, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await until(lambda: transport.closed)
        assert transport.take().startswith(b"HTTP/1.1 500 ")

    run(main())


# -- graceful and quick shutdown ------------------------------------------------------------------


def test_graceful_shutdown(pool: ThreadPool) -> None:
    release = asyncio.Event()

    class App:
        async_handler_awaitable = True

        async def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            if environ["PATH_INFO"] == "/slow":
                await release.wait()
            start_response("200 OK", [])
            return [b"done"]

    async def main() -> None:
        state = ServerState(ServerConfig(linger_timeout=0), pool=pool)
        app = App()
        busy = HttpProtocol(app, state)
        busy_t = FakeTransport(busy)
        busy.connection_made(busy_t)
        idle = HttpProtocol(app, state)
        idle_t = FakeTransport(idle)
        idle.connection_made(idle_t)
        await feed(idle, b"GET /fast HTTP/1.1\r\nHost: h\r\n\r\n")
        await until(lambda: b"done" in idle_t.out)
        await feed(
            busy, b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\nGET /fast HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        await asyncio.sleep(0.01)
        state.shutdown()
        await asyncio.sleep(0)
        assert idle_t.closed and not busy_t.closed
        assert not await state.wait_closed(0.02)
        release.set()
        assert await state.wait_closed(2)
        responses = parse_responses(busy_t.take())
        assert [(r.body, r.header("Connection")) for r in responses] == [(b"done", "close")]

    run(main())


def test_quick_shutdown_cancels(pool: ThreadPool) -> None:
    app = SleepingApp()
    events = app.events

    async def main() -> None:
        proto, transport, state = connect(app, pool)
        await feed(proto, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await until(lambda: events == ["entered"])
        state.abort()
        assert await state.wait_closed(2)
        await until(lambda: events == ["entered", "cancelled"])
        assert transport.aborted

    run(main())


def test_server_config_validation() -> None:
    with pytest.raises(ValueError, match="keepalive"):
        ServerConfig(keepalive=-1)
    with pytest.raises(ValueError, match="script_name"):
        ServerConfig(script_name="/app/")
    with pytest.raises(ValueError, match="forwarded_allow_ips"):
        ServerConfig(forwarded_allow_ips=("not-an-ip",))
    with pytest.raises(ValueError, match="request_timeout"):
        ServerConfig(request_timeout=0)


@pytest.mark.parametrize("how", HOW)
def test_upgrade_request_answered_then_closed(pool: ThreadPool, how: str) -> None:
    """We speak no other protocol: an Upgrade (or CONNECT) request is answered as plain HTTP,
    its Content-Length body is still delivered, and nothing after it is parsed."""
    app = Recorder()

    async def main() -> None:
        proto, transport, _ = connect(app, pool)
        raw = (
            b"POST /up HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nContent-Length: 5\r\n\r\n"
            b"hello" + b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        )
        await feed(proto, raw, how)
        await until(lambda: transport.closed)
        (r,) = parse_responses(transport.take())
        assert (r.status, r.header("Connection")) == (200, "close")

    run(main())
    assert app.bodies == [b"hello"]
    assert app.environs[0]["HTTP_UPGRADE"] == "h2c"


def test_upgrade_with_chunked_body_refused(pool: ThreadPool) -> None:
    raw = (
        b"POST / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert_refused(pool, raw, 400, b"Upgrade request with a chunked body")


def test_connect_answered_then_closed(pool: ThreadPool) -> None:
    app = Recorder()

    async def main() -> None:
        proto, transport, _ = connect(app, pool)
        await feed(proto, b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\nxx")
        await until(lambda: transport.closed)

    run(main())
    env = app.environs[0]
    assert (env["REQUEST_METHOD"], env["PATH_INFO"], env["RAW_URI"]) == (
        "CONNECT",
        "",
        "example.org:443",
    )


def test_pipelining_flood_is_parsed_in_bounded_steps(pool: ThreadPool) -> None:
    """A single read holding 2000 tiny requests must not become 2000 queued requests."""
    app = AsyncRecorder()
    peak = 0

    async def main() -> None:
        nonlocal peak
        proto, transport, _ = connect(app, pool)
        raw = b"".join(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in range(2000))
        proto.data_received(raw)
        assert not transport.reading
        while len(app.environs) < 2000:
            peak = max(peak, len(proto._cycles))
            await asyncio.sleep(0)
        await until(lambda: transport.out.count(b"HTTP/1.1 200 OK") == 2000)
        assert transport.reading and not transport.closed
        bodies = [r.body for r in parse_responses(transport.take(), eof=False)]
        assert bodies == [b"async:/%d" % i for i in range(2000)]

    run(main())
    assert 0 < peak < 200, peak


def test_app_connection_error_is_an_app_error(pool: ThreadPool) -> None:
    """An application's own ConnectionError (say, its database refused) is a 500, not a
    silently dropped client."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise ConnectionRefusedError("database down")

    assert get(pool, "/", app=app).startswith(b"HTTP/1.1 500 ")


def test_status_without_reason_phrase(pool: ThreadPool) -> None:
    raw = get(pool, "/", app=text_app(status="299"))
    assert raw.startswith(b"HTTP/1.1 299 \r\n")


def test_shutdown_serves_request_already_on_the_wire(pool: ThreadPool) -> None:
    """A connection accepted but silent when shutdown starts may already carry a request:
    it is answered (with Connection: close); one that stays silent closes after a grace."""
    config = ServerConfig(header_timeout=1.0, linger_timeout=0)

    async def main() -> None:
        state = ServerState(config, pool=pool)
        fresh = HttpProtocol(text_app(b"late"), state)
        fresh_t = FakeTransport(fresh)
        fresh.connection_made(fresh_t)
        silent = HttpProtocol(text_app(), state)
        silent_t = FakeTransport(silent)
        silent.connection_made(silent_t)
        state.shutdown()
        await asyncio.sleep(0)
        assert not fresh_t.closed and not silent_t.closed
        await feed(fresh, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await until(lambda: fresh_t.closed and silent_t.closed, timeout=3)
        (r,) = parse_responses(fresh_t.take())
        assert (r.body, r.header("Connection")) == (b"late", "close")
        assert silent_t.take() == b""
        assert await state.wait_closed(1)

    run(main())


def test_shutdown_closes_idle_keepalive_at_once(pool: ThreadPool) -> None:
    async def main() -> None:
        proto, transport, state = connect(text_app(), pool)
        await feed(proto, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await until(lambda: b"ok" in transport.out and not proto._cycles)
        state.shutdown()
        await asyncio.sleep(0)
        assert transport.closed

    run(main())


def test_send_timeout_drops_a_client_that_stops_reading(pool: ThreadPool) -> None:
    events: list[str] = []

    async def body() -> Any:
        try:
            while True:
                yield b"x" * 1024
        finally:
            events.append("closed")

    class App:
        async_handler_awaitable = True

        async def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
            start_response("200 OK", [])
            return body()

    async def main() -> None:
        config = ServerConfig(send_timeout=0.05, linger_timeout=0)
        proto, transport, state = connect(App(), pool, config)
        proto.pause_writing()  # the client's window stays shut
        await feed(proto, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        await until(lambda: transport.aborted, timeout=2)
        await until(lambda: events == ["closed"])
        assert await state.wait_closed(1)

    run(main())
