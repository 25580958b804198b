"""``benchmarks/download.py`` (the ``file`` scenario's client) against tiny scripted servers:
it counts exactly Content-Length bytes per response and stops on any response it must not count
(a short or long body, a closed connection, another status, no Content-Length)."""

from __future__ import annotations

import importlib.util
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest

from tests._support import REPO_ROOT

pytestmark = pytest.mark.server

BODY = bytes(range(256)) * 1024  # 256 KiB: more than the client's head buffer


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_download", REPO_ROOT / "benchmarks" / "download.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


download = _load()

#: Called once per request read from the connection, with its number (0, 1, ...): sends a
#: response, or returns False to close the connection.
Responder = Callable[[socket.socket, int], bool]


def _serve(listener: socket.socket, respond: Responder) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_connection, args=(conn, respond), daemon=True).start()


def _connection(conn: socket.socket, respond: Responder) -> None:
    with conn:
        data = b""
        number = 0
        try:
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                data = data.partition(b"\r\n\r\n")[2]
                if not respond(conn, number):
                    return
                number += 1
        except OSError:
            return


@pytest.fixture
def server() -> Iterator[Callable[[Responder], int]]:
    listeners: list[socket.socket] = []

    def start(respond: Responder) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)
        threading.Thread(target=_serve, args=(listener, respond), daemon=True).start()
        return int(listener.getsockname()[1])

    yield start
    for listener in listeners:
        listener.close()


def _head(length: int, status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {length}\r\n{extra}\r\n".encode()


def _good(conn: socket.socket, number: int) -> bool:
    conn.sendall(_head(len(BODY)) + BODY)
    return True


def _run(port: int, copy: bool = False) -> dict[str, int | float]:
    return download.run("127.0.0.1", port, "/file/", 2, 0.3, 5.0, copy)


@pytest.mark.parametrize("copy", [False, True], ids=["discard", "copy"])
def test_counts_whole_responses(server: Callable[[Responder], int], copy: bool) -> None:
    result = _run(server(_good), copy)
    assert result["requests"] > 2
    whole = len(_head(len(BODY))) + len(BODY)
    # Every completed response, and at most one partial body per connection at the deadline.
    assert result["requests"] * whole <= result["bytes"] < (result["requests"] + 2) * whole
    assert 0 <= result["client_cpu_share"]


def _short_body(conn: socket.socket, number: int) -> bool:
    if number == 0:
        conn.sendall(_head(len(BODY)) + BODY)
        return True
    conn.sendall(_head(len(BODY)) + BODY[:-1])
    return False


def _long_body(conn: socket.socket, number: int) -> bool:
    conn.sendall(_head(len(BODY)) + BODY + b"x")
    return True


def _long_small_body(conn: socket.socket, number: int) -> bool:
    conn.sendall(_head(3) + b"abcd")  # the extra byte arrives with the head
    return True


def _closed_between(conn: socket.socket, number: int) -> bool:
    if number == 0:
        conn.sendall(_head(len(BODY)) + BODY)
        return True
    return False  # closed without an answer (and without "Connection: close")


def _not_found(conn: socket.socket, number: int) -> bool:
    conn.sendall(_head(0, "404 Not Found"))
    return True


def _chunked(conn: socket.socket, number: int) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    return True


@pytest.mark.parametrize(
    ("respond", "message"),
    [
        (_short_body, "closed inside the body"),
        (_long_body, "not an HTTP/1.x status line"),
        (_long_small_body, "past the 3-byte body"),
        (_closed_between, "closed before the response head"),
        (_not_found, "status 404"),
        (_chunked, "Transfer-Encoding"),
    ],
)
def test_refuses_bad_responses(
    server: Callable[[Responder], int], respond: Responder, message: str
) -> None:
    with pytest.raises(download.DownloadError, match=message):
        _run(server(respond))


def test_bytes_after_the_last_body(server: Callable[[Responder], int]) -> None:
    # The last body byte comes after the deadline, with one byte too many: the run ends after
    # that response, so only the end-of-run check can see the extra byte.
    def respond(conn: socket.socket, number: int) -> bool:
        conn.sendall(_head(len(BODY)) + BODY[:-1])
        threading.Event().wait(0.5)
        conn.sendall(BODY[-1:] + b"x")
        return True

    with pytest.raises(download.DownloadError, match="past the end of the last body"):
        _run(server(respond))


def test_main_exits_1_with_the_reason(
    server: Callable[[Responder], int], capsys: pytest.CaptureFixture[str]
) -> None:
    port = server(_not_found)
    code = download.main(["--port", str(port), "--duration", "0.2", "--connections", "1"])
    assert code == 1
    assert "status 404, not 200" in capsys.readouterr().err
