"""AsyncDjangoApplication behind our gunicorn worker and behind plain WSGI servers."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import httpx
import pytest

from tests._support import raise_nofile_limit
from tests.server import GunicornServer

DJANGO_APP = "tests.djproject.wsgi:application"


def _observe(base: str) -> dict:
    return httpx.get(f"{base}/observe/", timeout=10).json()


@pytest.fixture(scope="module")
def worker():
    server = GunicornServer(
        DJANGO_APP,
        args=["--threads", "4", "--timeout", "30", "--worker-connections", "2000"],
        env={"DJPROJECT_MIDDLEWARE": "async"},
        ready_path="/async/hello/",
    )
    with server:
        yield server


async def _get(host: str, port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
        )
        data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_thousand_concurrent_async_views_and_a_blocking_sync_view(worker):
    raise_nofile_limit(4096)

    async def main():
        slow = asyncio.ensure_future(_get(worker.host, worker.port, "/sync/sleep/?s=2"))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        results = await asyncio.gather(
            *(_get(worker.host, worker.port, "/async/sleep/?s=1") for _ in range(1000))
        )
        elapsed = time.monotonic() - started
        return results, elapsed, await slow

    results, elapsed, slow = asyncio.run(main())
    assert [status for status, _ in results] == [200] * 1000
    assert all(body == b"slept" for _, body in results)
    assert slow == (200, b"slept")
    assert elapsed < 2.5, f"1,000 concurrent 1 s views took {elapsed:.2f} s on one worker"


def test_disconnect_cancels_the_view_and_request_finished_fires(worker):
    before = _observe(worker.url)
    tags = [f"dc{i}" for i in range(50)]
    socks = []
    for tag in tags:
        sock = socket.create_connection((worker.host, worker.port))
        sock.sendall(f"GET /async/sleep/?s=30&tag={tag} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        socks.append(sock)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        events = _observe(worker.url)["events"]
        if all(f"started {tag}" in events for tag in tags):
            break
        time.sleep(0.05)
    for sock in socks:
        sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = _observe(worker.url)
        if all(f"cancelled {tag}" in after["events"] for tag in tags):
            break
        time.sleep(0.05)
    assert all(f"cancelled {tag}" in after["events"] for tag in tags)
    started = after["signals"]["started"] - before["signals"]["started"]
    finished = after["signals"]["finished"] - before["signals"]["finished"]
    # The observing request itself has started but not finished when it reads the counters.
    assert started == finished
    assert after["tasks"] <= before["tasks"] + 2
    assert after["threads"] <= before["threads"] + 1


def test_hundred_megabyte_file_response_goes_through_sendfile(worker):
    before = _observe(worker.url)["sendfile"]
    digest = hashlib.sha256()
    size = 0
    with httpx.stream("GET", f"{worker.url}/big-file/?mb=100", timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == str(100 * 1024 * 1024)
        for chunk in response.iter_raw():
            digest.update(chunk)
            size += len(chunk)
    assert size == 100 * 1024 * 1024
    block = bytes(range(256)) * 4096
    expected = hashlib.sha256(block * (size // len(block))).hexdigest()
    assert digest.hexdigest() == expected
    after = _observe(worker.url)["sendfile"]
    assert after["sendfile_bytes"] - before["sendfile_bytes"] >= size


def test_signals_fire_once_per_request(worker):
    before = _observe(worker.url)["signals"]
    with httpx.Client(base_url=worker.url, timeout=10) as client:
        for path in [
            "/async/hello/",
            "/sync/hello/",
            "/async/stream/",
            "/sync/stream/",
            "/file/",
            "/async/raise/error/",
            "/nope/",
        ] * 5:
            client.get(path)
    after = _observe(worker.url)["signals"]
    # Between the two snapshots: the first /observe/ request's own request_finished, the 35
    # requests, and the second /observe/ request's request_started.
    assert after["started"] - before["started"] == 35 + 1
    assert after["finished"] - before["finished"] == 1 + 35


# -- the same application under plain WSGI servers (the sync fallback)

PLAIN_CASES = [
    ("/sync/hello/", b"Hello, sync world"),
    ("/async/hello/", b"Hello, async world"),
    ("/async/stream/", b"".join(f"async chunk {i}\n".encode() for i in range(5))),
    ("/sync/stream/", b"".join(f"sync chunk {i}\n".encode() for i in range(5))),
    ("/async/template/", b"<p>Hello from async (template hook)</p>\n"),
]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def wsgiref_server(django_project):
    from async_handler import AsyncDjangoApplication

    server: WSGIServer = make_server(
        "127.0.0.1", 0, AsyncDjangoApplication(), handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("path", "body"), PLAIN_CASES)
def test_served_by_wsgiref(wsgiref_server, path, body):
    response = httpx.get(wsgiref_server + path, timeout=10)
    assert response.status_code == 200
    assert response.content == body


@pytest.fixture(scope="module")
def sync_worker():
    with GunicornServer(DJANGO_APP, worker_class="sync", ready_path="/sync/hello/") as server:
        yield server


@pytest.mark.parametrize(("path", "body"), PLAIN_CASES)
def test_served_by_gunicorn_sync_worker(sync_worker, path, body):
    response = httpx.get(sync_worker.url + path, timeout=10)
    assert response.status_code == 200
    assert response.content == body


def test_async_stream_is_streamed_by_gunicorn_sync_worker(sync_worker):
    # Chunked transfer: the stream is not collected into one buffer with a Content-Length.
    response = httpx.get(sync_worker.url + "/async/stream/", timeout=10)
    assert "content-length" not in response.headers
    assert response.headers.get("transfer-encoding") == "chunked"
