"""Smoke test: a real ``gunicorn -k async_handler.worker.AsyncioWorker`` on a free loopback port.

Serves a tiny contract app and a tiny plain WSGI app, reports sendfile counters from inside the
worker, and checks that a bad ``ASYNC_HANDLER_*`` value stops gunicorn at boot with an error
naming the variable.  The full worker suites (corpus, hostile input, signals) live elsewhere.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._support import REPO_ROOT, free_port

from .test_protocol import parse_responses

pytestmark = pytest.mark.server

GUNICORN = [sys.executable, "-m", "gunicorn"]

APPS = '''
import json
import os
from async_handler.protocol import STATS

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data.bin")


class Contract:
    async_handler_awaitable = True

    async def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/file":
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            return environ["wsgi.file_wrapper"](open(DATA, "rb"))
        if path == "/sleep":
            import asyncio
            with open(DATA + ".sleeping", "w"):
                pass  # tells the test the request reached the app
            await asyncio.sleep(1.0)
        if path == "/scheme":
            start_response("200 OK", [])
            return [environ["wsgi.url_scheme"].encode()]
        if path == "/stats":
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps(STATS).encode()]
        if path == "/gc":
            import gc
            state = {"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps(state).encode()]
        start_response("200 OK", [("Content-Type", "text/plain")])
        body = "contract %s async=%s pid=%d" % (
            path, environ.get("async_handler.async"), os.getpid())
        return [body.encode()]


contract = Contract()


def plain(environ, start_response):
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"plain ", environ["PATH_INFO"].encode(), b" ",
            str("async_handler.async" in environ).encode(), b" ", body]
'''


def http(port: int, raw: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


class Gunicorn:
    def __init__(self, folder: Path, app: str, *extra: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.log = folder / f"gunicorn-{self.port}.log"
        self._log_handle = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [
                *GUNICORN,
                "-k", "async_handler.worker.AsyncioWorker",
                "--no-control-socket",
                "--threads", "4",
                "--timeout", "20",
                "--graceful-timeout", "5",
                "-b", f"127.0.0.1:{self.port}",
                "--chdir", str(folder),
                *extra,
                app,
            ],
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        )

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.02
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited early:\n{self.output()}")
            try:
                if http(self.port, b"GET /ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"):
                    return
            except OSError:
                pass
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
        raise AssertionError(f"gunicorn not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        if not self._log_handle.closed:
            self._log_handle.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self._log_handle.closed:
            self._log_handle.close()
        return self.proc.returncode


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "smoke_apps.py").write_text(textwrap.dedent(APPS))
    (tmp_path / "data.bin").write_bytes(b"0123456789" * 50_000)
    return tmp_path


@pytest.fixture
def contract_server(app_dir: Path) -> Iterator[Gunicorn]:
    server = Gunicorn(app_dir, "smoke_apps:contract", "--access-logfile", "-",
                      env={"ASYNC_HANDLER_LOOP": "asyncio"})
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_contract_app_under_gunicorn(contract_server: Gunicorn) -> None:
    raw = http(
        contract_server.port,
        b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    first, second = parse_responses(raw)
    assert first.status == 200 and first.body.startswith(b"contract /a async=True pid=")
    assert second.body.startswith(b"contract /b async=True")
    assert first.header("Server") == "gunicorn"


def test_sendfile_counters_inside_worker(contract_server: Gunicorn, app_dir: Path) -> None:
    raw = http(contract_server.port, b"GET /file HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    (response,) = parse_responses(raw)
    assert response.body == (app_dir / "data.bin").read_bytes()
    raw = http(contract_server.port, b"GET /stats HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    stats = json.loads(parse_responses(raw)[0].body)
    assert stats["sendfile_calls"] >= 1 and stats["sendfile_bytes"] >= 500_000


def _gc_state(port: int) -> dict[str, object]:
    raw = http(port, b"GET /gc HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    state: dict[str, object] = json.loads(parse_responses(raw)[0].body)
    return state


def test_worker_freezes_the_loaded_app_and_raises_the_gc_threshold(
    contract_server: Gunicorn,
) -> None:
    state = _gc_state(contract_server.port)
    assert state["threshold"] == [50_000, *gc.get_threshold()[1:]]
    assert isinstance(state["frozen"], int) and state["frozen"] > 1000  # gunicorn + the app


def test_gc_threshold_zero_leaves_the_collector_alone(app_dir: Path) -> None:
    server = Gunicorn(app_dir, "smoke_apps:contract", env={"ASYNC_HANDLER_GC_THRESHOLD": "0"})
    try:
        server.wait_ready()
        state = _gc_state(server.port)
    finally:
        server.stop()
    # What a fresh interpreter reports before any code runs: 0 on most, but CPython 3.12.1
    # starts with a few hundred objects already in the permanent generation.
    baseline = subprocess.run(
        [sys.executable, "-c", "import gc; print(gc.get_freeze_count())"],
        capture_output=True,
        check=True,
        text=True,
    )
    assert state == {"threshold": list(gc.get_threshold()), "frozen": int(baseline.stdout)}


def test_access_log_and_graceful_stop(contract_server: Gunicorn) -> None:
    http(contract_server.port, b"GET /logged?q=1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert contract_server.stop() == 0
    output = contract_server.output()
    assert '"GET /logged?q=1 HTTP/1.1" 200' in output, output


def test_plain_wsgi_app_under_gunicorn(app_dir: Path) -> None:
    server = Gunicorn(app_dir, "smoke_apps:plain")
    try:
        server.wait_ready()
        raw = http(
            server.port,
            b"POST /p HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
            b"\r\n3\r\nabc\r\n0\r\n\r\n",
        )
        (response,) = parse_responses(raw)
        assert response.body == b"plain /p False abc"
        raw = http(server.port, b"GET / HTTP/1.1\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 400 ")
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ASYNC_HANDLER_LOOP", "tokio"),
        ("ASYNC_HANDLER_MAX_BODY_SIZE", "lots"),
        ("ASYNC_HANDLER_HEADER_TIMEOUT", "-1"),
        ("ASYNC_HANDLER_GC_THRESHOLD", "-5"),
        ("ASYNC_HANDLER_GC_THRESHOLD", "50k"),
    ],
)
def test_bad_setting_is_boot_error(app_dir: Path, name: str, value: str) -> None:
    server = Gunicorn(app_dir, "smoke_apps:contract", env={name: value})
    try:
        code = server.proc.wait(30)
    finally:
        server.stop()
    assert code == 3, server.output()  # Arbiter.WORKER_BOOT_ERROR
    assert name in server.output()


def test_app_import_error_is_boot_error(app_dir: Path) -> None:
    server = Gunicorn(app_dir, "no_such_module:app")
    try:
        code = server.proc.wait(30)
    finally:
        server.stop()
    assert code in (3, 4), server.output()  # WORKER_BOOT_ERROR / APP_LOAD_ERROR
    assert "no_such_module" in server.output()


def test_max_requests_restarts_worker_without_dropping(app_dir: Path) -> None:
    server = Gunicorn(app_dir, "smoke_apps:contract", "--max-requests", "3")
    try:
        server.wait_ready()  # counts as one request
        pids = set()
        deadline = time.monotonic() + 30
        while len(pids) < 2:
            assert time.monotonic() < deadline, server.output()
            try:
                raw = http(server.port, b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            except ConnectionRefusedError:
                continue
            (response,) = parse_responses(raw)
            assert response.status == 200, raw
            pids.add(response.body.rsplit(b"pid=", 1)[1])
        assert "Autorestarting worker after current request." in server.output()
    finally:
        assert server.stop() == 0


def test_sigterm_finishes_in_flight_request(app_dir: Path) -> None:
    server = Gunicorn(app_dir, "smoke_apps:contract")
    try:
        server.wait_ready()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /sleep HTTP/1.1\r\nHost: t\r\n\r\n")
            marker = app_dir / "data.bin.sleeping"
            deadline = time.monotonic() + 10
            while not marker.exists():  # the request reached the app (which sleeps 1 s)
                assert time.monotonic() < deadline, server.output()
                time.sleep(0.01)
            server.proc.send_signal(signal.SIGTERM)
            chunks = []
            while data := sock.recv(65536):
                chunks.append(data)
        (response,) = parse_responses(b"".join(chunks))
        assert response.status == 200 and response.body.startswith(b"contract /sleep")
        assert response.header("Connection") == "close"
        assert server.proc.wait(15) == 0
    finally:
        server.stop()


def test_worker_connections_limit(app_dir: Path) -> None:
    server = Gunicorn(app_dir, "smoke_apps:contract", "--worker-connections", "1",
                      "--keep-alive", "30")
    try:
        server.wait_ready()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as first:
            first.sendall(b"GET /one HTTP/1.1\r\nHost: t\r\n\r\n")
            assert b"contract /one" in first.recv(65536)
            second = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            second.sendall(b"GET /two HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            second.settimeout(0.5)
            with pytest.raises(socket.timeout):
                second.recv(65536)  # not accepted while the first connection lives
        second.settimeout(10)
        with second:
            assert b"contract /two" in second.recv(65536)
    finally:
        server.stop()


def test_tls_from_certfile(app_dir: Path) -> None:
    import ssl

    from tests._support import require_program

    openssl = require_program("openssl")
    cert, key = app_dir / "cert.pem", app_dir / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    server = Gunicorn(app_dir, "smoke_apps:contract", "--certfile", str(cert),
                      "--keyfile", str(key))
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    try:
        deadline = time.monotonic() + 20
        while True:
            assert server.proc.poll() is None, server.output()
            try:
                with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
                    with context.wrap_socket(raw) as tls:
                        tls.sendall(b"GET /scheme HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                        data = b""
                        while chunk := tls.recv(65536):
                            data += chunk
                break
            except (ConnectionRefusedError, ssl.SSLError):
                assert time.monotonic() < deadline, server.output()
                time.sleep(0.1)
        (response,) = parse_responses(data)
        assert response.body == b"https"
    finally:
        server.stop()


HOOKS_CONF = """
import json

def pre_request(worker, req):
    with open(LOG, "a") as f:
        f.write(json.dumps(["pre", req.method, req.path, req.query, list(req.version),
                            [list(h) for h in req.headers if h[0] == "X-HOOK"]]) + "\\n")

def post_request(worker, req, environ, resp):
    with open(LOG, "a") as f:
        f.write(json.dumps(["post", req.uri, resp.status, resp.sent]) + "\\n")
"""


def test_hooks_and_unix_socket(app_dir: Path) -> None:
    hook_log = app_dir / "hooks.jsonl"
    conf = app_dir / "conf.py"
    conf.write_text(f"LOG = {str(hook_log)!r}\n" + HOOKS_CONF)
    sock_path = app_dir / "g.sock"
    server = Gunicorn(app_dir, "smoke_apps:plain", "-c", str(conf), "-b", f"unix:{sock_path}")
    try:
        deadline = time.monotonic() + 20
        while True:
            assert server.proc.poll() is None, server.output()
            try:
                with socket.socket(socket.AF_UNIX) as client:
                    client.settimeout(5)
                    client.connect(str(sock_path))
                    client.sendall(
                        b"GET /u?x=1 HTTP/1.1\r\nHost: example.org:81\r\nX-Hook: yes\r\n"
                        b"Connection: close\r\n\r\n"
                    )
                    data = b""
                    while chunk := client.recv(65536):
                        data += chunk
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert time.monotonic() < deadline, server.output()
                time.sleep(0.05)
        (response,) = parse_responses(data)
        assert response.body == b"plain /u False "
    finally:
        server.stop()
    records = [json.loads(line) for line in hook_log.read_text().splitlines()]
    assert records == [
        ["pre", "GET", "/u", "x=1", [1, 1], [["X-HOOK", "yes"]]],
        ["post", "/u?x=1", "200 OK", len(b"plain /u False ")],
    ]
