"""The worker end to end: a real gunicorn subprocess, real sockets, real clients.

Concurrency on one worker, HTTP/1.1 connection handling (keep-alive, pipelining, HTTP/1.0,
chunked uploads, 100-continue), cancellation, timeouts, TLS, the access log, plain WSGI and Flask
applications, and ``wsgi.file_wrapper`` sent with ``sendfile``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import gunicorn
import httpx
import pytest

from tests._support import raise_nofile_limit, require_program
from tests.server import (
    CONTRACT_APP,
    GunicornServer,
    Response,
    async_request,
    gunicorn_server,
    make_self_signed_cert,
    wait_until,
)

pytestmark = [pytest.mark.server, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def server() -> Iterator[GunicornServer]:
    raise_nofile_limit(4096)
    # worker_connections defaults to 1000; the concurrency test opens 1,001 at once.
    with gunicorn_server(CONTRACT_APP, ["--worker-connections", "2000"]) as srv:
        yield srv


# -- concurrency ------------------------------------------------------------------------------


def test_1000_concurrent_async_requests_beside_a_sync_one(server: GunicornServer) -> None:
    """Issue 3: 1,000 ``asyncio.sleep(1)`` requests on ONE worker finish in under 2.5 s while
    a sync request sleeps 2 s in the thread pool."""
    pid = server.worker_pid()

    async def main() -> tuple[float, float, list[Response | BaseException], Response]:
        start = time.monotonic()
        sync_task = asyncio.ensure_future(
            async_request(server.port, "/sync-sleep?s=2", timeout=20.0)
        )
        results = await asyncio.gather(
            *(async_request(server.port, "/sleep?s=1", timeout=20.0) for _ in range(1000)),
            return_exceptions=True,
        )
        async_elapsed = time.monotonic() - start
        sync_response = await sync_task
        return async_elapsed, time.monotonic() - start, results, sync_response

    async_elapsed, sync_elapsed, results, sync_response = asyncio.run(main())
    failures = [r for r in results if not isinstance(r, Response) or r.status != 200]
    assert not failures, f"{len(failures)} of 1000 failed, e.g. {failures[:3]!r}"
    assert all(isinstance(r, Response) and r.body == b"slept" for r in results)
    assert sync_response.status == 200 and sync_response.body == b"slept sync"
    assert async_elapsed < 2.5, f"1,000 concurrent 1 s sleeps took {async_elapsed:.2f}s"
    assert sync_elapsed >= 2.0, "the sync request did not sleep: the test proves nothing"
    assert server.worker_pid() == pid


# -- the environ ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "app", [CONTRACT_APP, "tests.apps.plain:app"], ids=["contract-app", "plain-wsgi-app"]
)
def test_whole_environ(app: str) -> None:
    """Every key the worker puts in the environ, and every scalar value, for one request."""
    request = (
        b"POST /a%20b/c?x=1&y=%20 HTTP/1.1\r\nHost: example.test:8080\r\n"
        b"Content-Type: text/plain\r\nX-Multi: 1\r\nX-Multi: 2\r\nContent-Length: 3\r\n"
        b"Connection: close\r\n\r\nabc"
    )
    contract = app == CONTRACT_APP
    with gunicorn_server(app) as srv, srv.client() as client:
        client.send(request)
        response = client.read_final_response()
        client_port = client.sock.getsockname()[1]
    assert response.status == 200
    echo = response.json()
    expected = {
        "CONTENT_LENGTH": "3",
        "CONTENT_TYPE": "text/plain",
        "HTTP_CONNECTION": "close",
        "HTTP_HOST": "example.test:8080",
        # RFC 9110 §5.3: repeated fields combine into one comma-separated list.
        "HTTP_X_MULTI": "1,2",
        "PATH_INFO": "/a b/c",
        "QUERY_STRING": "x=1&y=%20",
        "RAW_URI": "/a%20b/c?x=1&y=%20",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": str(client_port),
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        # As gunicorn: the listening address for TCP (the Host header only for Unix sockets).
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": str(srv.port),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_SOFTWARE": f"gunicorn/{gunicorn.__version__}",
        "wsgi.input_terminated": True,
        "wsgi.multiprocess": False,
        "wsgi.multithread": True,
        "wsgi.run_once": False,
        "wsgi.url_scheme": "http",
    }
    if contract:
        expected["async_handler.async"] = True
    assert echo["environ"] == expected
    objects = {"wsgi.errors", "wsgi.file_wrapper", "wsgi.input", "wsgi.version"}
    if contract:
        objects.add("async_handler.thread_pool")
    assert set(echo["environ_keys"]) == set(expected) | objects
    assert echo["wsgi_version"] == [1, 0]
    assert echo["body"] == "abc"


# -- connection handling ------------------------------------------------------------------------


def test_keep_alive_reuses_the_connection(server: GunicornServer) -> None:
    with server.client() as client:
        ports = set()
        for i in range(5):
            response = client.request("GET", f"/echo?i={i}")
            assert response.status == 200
            echo = response.json()
            assert echo["query"] == f"i={i}"
            ports.add(echo["environ"]["REMOTE_PORT"])
            assert response.header("connection") in (None, "keep-alive"), response.headers
        assert len(ports) == 1, "the five requests came over different connections"
        assert not client.is_closed(0.1)


def test_idle_keep_alive_connection_closed_after_keepalive_seconds() -> None:
    with gunicorn_server(CONTRACT_APP, ["--keep-alive", "1"]) as srv, srv.client() as client:
        assert client.request("GET", "/echo").status == 200
        start = time.monotonic()
        assert not client.is_closed(0.5), "closed before the keep-alive time"
        assert client.is_closed(3.0), "idle connection kept past --keep-alive"
        assert 0.9 <= time.monotonic() - start < 3.0


def test_pipelined_requests_answered_in_order(server: GunicornServer) -> None:
    # RFC 9112 §9.3.2: responses to pipelined requests go in the order the requests came, even
    # when the first takes longest.
    requests = (
        b"GET /sleep?s=0.3 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /echo?i=2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\ntwo"
        b"GET /echo?i=3 HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    with server.client() as client:
        client.send(requests)
        first = client.read_final_response()
        second = client.read_final_response()
        third = client.read_final_response()
    assert (first.status, first.body) == (200, b"slept")
    assert second.json()["query"] == "i=2" and second.json()["body"] == "two"
    assert third.json()["query"] == "i=3" and third.json()["method"] == "GET"


def test_http10_request_closes_after_response(server: GunicornServer) -> None:
    with server.client() as client:
        client.send(b"GET /echo?v=10 HTTP/1.0\r\n\r\n")
        response = client.read_final_response()
        assert response.status == 200
        assert response.json()["protocol"] == "HTTP/1.0"
        assert client.is_closed(3.0), "HTTP/1.0 without keep-alive must close (RFC 9112 §9.3)"


def test_http10_keep_alive(server: GunicornServer) -> None:
    with server.client() as client:
        for i in range(2):
            client.send(b"GET /echo?i=%d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" % i)
            response = client.read_final_response()
            assert response.status == 200
            assert response.json()["query"] == f"i={i}"
            assert (response.header("connection") or "").lower() == "keep-alive"


def test_http10_streamed_body_is_close_delimited(server: GunicornServer) -> None:
    # No chunked coding in HTTP/1.0 (RFC 9112 §7): an unknown-length body ends with the close.
    with server.client() as client:
        client.send(b"GET /stream?n=4 HTTP/1.0\r\n\r\n")
        data = client.read_until_close(5.0)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], data[:300]
    assert b"transfer-encoding" not in head.lower(), head
    assert body == b"".join(b"line %d\n" % i for i in range(4))


def test_streamed_body_is_chunked_on_http11(server: GunicornServer) -> None:
    with server.client() as client:
        client.send(b"GET /stream?n=5 HTTP/1.1\r\nHost: a\r\n\r\n")
        response = client.read_final_response()
    assert response.status == 200
    assert response.header("transfer-encoding") == "chunked"
    assert response.body == b"".join(b"line %d\n" % i for i in range(5))


def test_chunked_upload_is_dechunked_with_content_length(server: GunicornServer) -> None:
    payload = [os.urandom(1000), b"x" * 70_000, b"end"]
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payload) + b"0\r\n\r\n"
    with server.client() as client:
        client.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        response = client.read_final_response()
    assert response.status == 200
    echo = response.json()
    whole = b"".join(payload)
    assert echo["content_length"] == str(len(whole))
    assert echo["body_sha256"] == hashlib.sha256(whole).hexdigest()
    # Passing the (now satisfied) Transfer-Encoding on is what gunicorn does too.
    assert echo["headers"].get("HTTP_TRANSFER_ENCODING", "chunked") == "chunked"


def test_100_continue(server: GunicornServer) -> None:
    # RFC 9110 §10.1.1: the server asks for the body with 100 before the client sends it.
    with server.client() as client:
        client.send(
            b"POST /echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        interim = client.read_response(timeout=3.0)
        assert interim.status == 100, interim
        client.send(b"hello")
        response = client.read_final_response()
    assert response.status == 200
    assert response.json()["body"] == "hello"


def test_100_continue_not_sent_when_refusing(server: GunicornServer) -> None:
    with server.client() as client:
        client.send(
            b"POST /echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
            b"Content-Length: 10737418240\r\n\r\n"
        )
        response = client.read_response(timeout=3.0)
    assert response.status == 413, "a body the server will refuse must not be asked for"


# -- cancellation and timeouts --------------------------------------------------------------------


@pytest.mark.parametrize("abortive", [False, True], ids=["close", "reset"])
def test_client_disconnect_cancels_the_app_task(server: GunicornServer, abortive: bool) -> None:
    # "close": an ordinary close (FIN), what a browser does when the user navigates away.
    # "reset": an abortive close (RST, SO_LINGER 0).
    probe = f"disconnect-{abortive}-{time.monotonic_ns()}"
    with server.client() as client:
        client.send(f"GET /cancel-probe?id={probe} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        wait_until(lambda: f"started {probe}" in server.events(), 5.0, "the probe to start")
        if abortive:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_until(
        lambda: f"cancelled {probe}" in server.events(),
        5.0,
        f"the app task to be cancelled after the client left; events {server.events()!r}",
    )


def test_request_timeout_answers_503() -> None:
    with gunicorn_server(CONTRACT_APP, env={"ASYNC_HANDLER_REQUEST_TIMEOUT": "1"}) as srv:
        probe = "timeout-probe"
        start = time.monotonic()
        with srv.client() as client:
            client.send(f"GET /cancel-probe?id={probe} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            response = client.read_final_response(timeout=10.0)
        elapsed = time.monotonic() - start
        assert response.status == 503, response
        assert 0.9 <= elapsed < 5.0, f"503 after {elapsed:.2f}s, timeout was 1 s"
        wait_until(lambda: f"cancelled {probe}" in srv.events(), 5.0, "the app task cancelled")


# -- TLS, access log ------------------------------------------------------------------------------


def test_tls_request(tmp_path: Path) -> None:
    openssl = require_program("openssl")
    tls = make_self_signed_cert(tmp_path, openssl)
    with gunicorn_server(CONTRACT_APP, tls=tls) as srv:
        ctx = srv.tls_context()
        assert ctx is not None
        with httpx.Client(verify=ctx, timeout=10.0) as client:
            response = client.post(f"{srv.url}/echo?tls=1", content=b"secret")
        assert response.status_code == 200
        echo = response.json()
        assert echo["scheme"] == "https"
        assert echo["environ"]["wsgi.url_scheme"] == "https"
        assert echo["body"] == "secret"
        assert echo["environ"]["SERVER_PORT"] == str(srv.port)


def test_access_log_uses_custom_format() -> None:
    fmt = (
        "ACCESS method=%(m)s path=%(U)s query=%(q)s status=%(s)s bytes=%(B)s ua=%(a)s "
        "x=%({x-probe}i)s"
    )
    args = ["--access-logfile", "-", "--access-logformat", fmt]
    with gunicorn_server(CONTRACT_APP, args) as srv:
        response = srv.get("/sleep?s=0", headers=[("User-Agent", "e2e/1"), ("X-Probe", "p1")])
        assert response.status == 200
        srv.wait_for_log(
            r"ACCESS method=GET path=/sleep query=s=0 status=200 bytes=5 ua=e2e/1 x=p1",
            timeout=5.0,
        )


def test_request_hooks_run_without_an_access_log(tmp_path) -> None:
    # The worker skips building gunicorn's request/response views when nothing looks at them;
    # a config file's own pre_request / post_request hooks must still see every request.
    conf = tmp_path / "hooks.py"
    conf.write_text(
        "def pre_request(worker, req):\n"
        "    worker.log.warning('PRE %s %s', req.method, req.path)\n"
        "def post_request(worker, req, environ, resp):\n"
        "    worker.log.warning('POST %s %s %s', req.method, req.path, resp.status_code)\n"
    )
    with gunicorn_server(CONTRACT_APP, ["--config", str(conf)]) as srv:
        assert srv.get("/echo?x=1").status == 200
        srv.wait_for_log(r"PRE GET /echo", timeout=5.0)
        srv.wait_for_log(r"POST GET /echo 200", timeout=5.0)


def test_default_pre_request_logs_at_debug_level() -> None:
    with gunicorn_server(CONTRACT_APP, ["--log-level", "debug"]) as srv:
        assert srv.get("/sleep?s=0").status == 200
        srv.wait_for_log(r"\] GET /sleep\n", timeout=5.0)


def test_boot_logs_pool_size_and_warns_on_default_threads() -> None:
    """Issue 11: gunicorn's default threads = 1 runs sync code one request at a time; say so."""
    with gunicorn_server(CONTRACT_APP) as srv:
        assert srv.get("/echo").status == 200
        srv.wait_for_log(r"\[INFO\] async_handler worker: 1 pool thread", timeout=5.0)
        # uvloop is in the test extra, so `auto` must pick it on every supported Python.
        srv.wait_for_log(r"\[INFO\] async_handler worker: uvloop\.Loop event loop", timeout=5.0)
        warning = srv.wait_for_log(r"\[WARNING\] async_handler worker with threads = 1.*", 5.0)
    assert "one request at a time" in warning.group(0)
    assert "--threads" in warning.group(0)
    with gunicorn_server(CONTRACT_APP, ["--threads", "4"]) as srv:
        assert srv.get("/echo").status == 200
        line = srv.wait_for_log(r"\[INFO\] async_handler worker: 4 pool thread.*", timeout=5.0)
        # gunicorn's default worker_connections is 1000.
        assert "up to 1000 overflow thread(s)" in line.group(0)
        assert "threads = 1" not in srv.log_text()


# -- other applications -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "app",
    ["tests.apps.plain:app", "tests.apps.flask_app:app"],
    ids=["bare-wsgi-callable", "flask"],
)
def test_plain_wsgi_apps_are_served(app: str) -> None:
    with gunicorn_server(app) as srv, httpx.Client(timeout=10.0) as client:
        response = client.post(f"{srv.url}/some/path?a=1", content=b"payload")
        assert response.status_code == 200
        echo = response.json()
        assert echo["path"] == "/some/path"
        assert echo["query"] == "a=1"
        assert echo["body"] == "payload"
        # A plain WSGI app runs in a pool thread, never on the loop, without the contract key.
        assert "async_handler.async" not in echo["environ_keys"]
        assert echo["thread"] != "MainThread"
        assert echo["environ"]["wsgi.multithread"] is True


def test_write_callable_app_is_served() -> None:
    with gunicorn_server("tests.apps.plain:write_app") as srv:
        response = srv.get("/write")
        assert response.status == 200
        assert response.body == b"written by write() ok"


# -- wsgi.file_wrapper ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 100 MB file of random bytes and its sha256."""
    size = 100 * 1024 * 1024
    block = os.urandom(1024 * 1024)
    path = tmp_path_factory.mktemp("files") / "big.bin"
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for i in range(size // len(block)):
            piece = block[i:] + block[:i]
            f.write(piece)
            digest.update(piece)
    return path, digest.hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["asyncio", "auto"])
def test_100mb_file_wrapper_uses_sendfile(loop: str, big_file: tuple[Path, str]) -> None:
    """``auto`` is the default: uvloop when installed (it is, in the test extra)."""
    path, digest = big_file
    size = path.stat().st_size
    with gunicorn_server(CONTRACT_APP, env={"ASYNC_HANDLER_LOOP": loop}) as srv:
        before = httpx.get(f"{srv.url}/stats", timeout=10.0).json()
        received = hashlib.sha256()
        length = 0
        with httpx.stream("GET", f"{srv.url}/file", params={"path": str(path)}, timeout=30.0) as r:
            assert r.status_code == 200
            assert r.headers["content-length"] == str(size)
            for chunk in r.iter_raw():
                received.update(chunk)
                length += len(chunk)
        assert length == size
        assert received.hexdigest() == digest
        after = httpx.get(f"{srv.url}/stats", timeout=10.0).json()
    assert after["sendfile_calls"] > before["sendfile_calls"], (before, after)
    assert after["sendfile_bytes"] - before["sendfile_bytes"] == size, (before, after)


def test_file_wrapper_over_tls_is_intact(tmp_path: Path) -> None:
    # sendfile cannot go through TLS; the worker must fall back to reading the file.
    openssl = require_program("openssl")
    tls = make_self_signed_cert(tmp_path, openssl)
    path = tmp_path / "data.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    path.write_bytes(data)
    with gunicorn_server(CONTRACT_APP, tls=tls) as srv:
        ctx = srv.tls_context()
        assert ctx is not None
        with httpx.Client(verify=ctx, timeout=20.0) as client:
            response = client.get(f"{srv.url}/file", params={"path": str(path)})
    assert response.status_code == 200
    assert hashlib.sha256(response.content).digest() == hashlib.sha256(data).digest()


def test_server_header_and_date(server: GunicornServer) -> None:
    response = server.get("/pid")
    assert response.status == 200
    date = response.header("date")
    assert date is not None and re.fullmatch(
        r"\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} GMT", date
    ), date
