"""A real gunicorn running our worker in a subprocess, plus a raw-socket HTTP/1.1 client.

:class:`GunicornServer` starts ``python -m gunicorn -k async_handler.worker.AsyncioWorker`` on a
free loopback port with one worker, captures its output to a log file, waits (by polling, never by
a fixed sleep) until the worker answers, and stops it with SIGTERM, then SIGKILL after a bound.

The apps under :mod:`tests.apps` append one line per call to the file named by the environment
variable ``TEST_APP_CALL_LOG``; the server points it at a file of its own so that a test can prove
that a refused request never reached the application (:meth:`GunicornServer.calls_since`).

:class:`RawClient` speaks HTTP/1.1 over a plain socket so that tests control every byte sent and
see every byte received (status lines, interim 100 responses, connection close).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from tests._support import REPO_ROOT, free_port, wait_serving

__all__ = [
    "WORKER_CLASS",
    "GunicornServer",
    "RawClient",
    "Response",
    "async_request",
    "exchange",
    "gunicorn_server",
    "is_closed",
    "make_self_signed_cert",
    "parse_responses",
    "wait_until",
]

#: The worker under test.  ``TEST_GUNICORN_WORKER_CLASS`` overrides it, to run the same tests
#: against a stock gunicorn worker (``gthread``) when comparing behaviour.
WORKER_CLASS = os.environ.get("TEST_GUNICORN_WORKER_CLASS", "async_handler.worker.AsyncioWorker")
CONTRACT_APP = "tests.apps.contract:app"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it is true; fail the test naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


# ---------------------------------------------------------------------------------------------
# Raw HTTP/1.1 client


@dataclasses.dataclass
class Response:
    """One HTTP response as read off the wire (interim 1xx responses are separate objects)."""

    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in order."""
        lname = name.lower()
        return [value for key, value in self.headers if key.lower() == lname]

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)


class IncompleteResponse(Exception):
    """The buffer does not hold a whole response yet."""


_STATUS_LINE = re.compile(rb"^(HTTP/\d\.\d) (\d{3})(?: (.*))?$")


def _parse_one(buf: bytes, *, head_request: bool, eof: bool) -> tuple[Response, int]:
    """Parse one response at the start of ``buf``; return it and the bytes it used.

    Raises :class:`IncompleteResponse` when more bytes are needed, ``ValueError`` when the bytes
    are not an HTTP/1.x response.  With ``eof`` a body delimited by the close is complete.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if eof and buf:
            raise ValueError(f"connection closed inside a response head: {buf[:200]!r}")
        raise IncompleteResponse
    head = buf[:end]
    lines = head.split(b"\r\n")
    match = _STATUS_LINE.match(lines[0])
    if match is None:
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:200]!r}")
    version = match.group(1).decode()
    status = int(match.group(2))
    reason = (match.group(3) or b"").decode("latin-1")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"response header line without a colon: {line[:200]!r}")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    pos = end + 4
    response = Response(version, status, reason, headers, b"", head)
    if 100 <= status < 200 or status in (204, 304) or head_request:
        return response, pos
    te = ",".join(v for k, v in headers if k.lower() == "transfer-encoding").lower()
    if "chunked" in te:
        body = bytearray()
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                raise IncompleteResponse
            size_text = buf[pos:line_end].split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ValueError(f"bad chunk size line {buf[pos:line_end]!r}") from None
            pos = line_end + 2
            if size == 0:
                # Trailer section, ended by an empty line.
                trailer_end = buf.find(b"\r\n\r\n", pos - 2)
                if trailer_end < 0:
                    raise IncompleteResponse
                pos = trailer_end + 4
                break
            if len(buf) < pos + size + 2:
                raise IncompleteResponse
            body += buf[pos : pos + size]
            if buf[pos + size : pos + size + 2] != b"\r\n":
                raise ValueError("chunk data not followed by CRLF")
            pos += size + 2
        response.body = bytes(body)
        return response, pos
    length_text = response.header("content-length")
    if length_text is not None:
        length = int(length_text)
        if len(buf) < pos + length:
            raise IncompleteResponse
        response.body = buf[pos : pos + length]
        return response, pos + length
    # Delimited by the close (RFC 9112 §6.3 rule 8).
    if not eof:
        raise IncompleteResponse
    response.body = buf[pos:]
    return response, len(buf)


def parse_responses(data: bytes, *, head_request: bool = False) -> list[Response]:
    """Parse every complete response in ``data`` (a whole conversation, read until close)."""
    responses: list[Response] = []
    while data:
        try:
            response, used = _parse_one(data, head_request=head_request, eof=True)
        except IncompleteResponse:
            break
        responses.append(response)
        data = data[used:]
    return responses


class RawClient:
    """A socket to the server with a receive buffer; every byte is under the test's control."""

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        timeout: float = 10.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
        self.sock: socket.socket = sock
        self.timeout = timeout
        self.buffer = b""
        #: Every byte received on this connection, for failure messages.
        self.received = bytearray()
        self.eof = False

    def __enter__(self) -> RawClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send all of ``data``."""
        self.sock.sendall(data)

    def half_close(self) -> None:
        """Shut down the sending side (the server sees EOF, we can still read)."""
        self.sock.shutdown(socket.SHUT_WR)

    def _fill(self, deadline: float) -> bool:
        """Read once into the buffer; return False on timeout. Sets ``eof`` on close or reset."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(262144)
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.eof = True
        self.buffer += chunk
        self.received += chunk
        return True

    def read_response(self, timeout: float | None = None, *, head: bool = False) -> Response:
        """Read exactly one response (an interim 1xx counts as one); fail the test on timeout."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                response, used = _parse_one(self.buffer, head_request=head, eof=self.eof)
            except IncompleteResponse:
                if self.eof:
                    pytest.fail(
                        f"connection closed before a whole response; got {self.buffer[:300]!r}"
                    )
                if not self._fill(deadline):
                    pytest.fail(f"no whole response in time; got {self.buffer[:300]!r}")
                continue
            self.buffer = self.buffer[used:]
            return response

    def read_final_response(self, timeout: float | None = None) -> Response:
        """Read responses until a non-1xx one; return it."""
        while True:
            response = self.read_response(timeout)
            if response.status >= 200:
                return response

    def read_until_close(self, timeout: float | None = None) -> bytes:
        """Read until the server closes; fail the test if it does not within ``timeout``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.eof:
            if not self._fill(deadline):
                pytest.fail(f"server did not close the connection; got {self.buffer[:300]!r}")
        data, self.buffer = self.buffer, b""
        return data

    def is_closed(self, timeout: float = 2.0) -> bool:
        """Whether the server closes the connection within ``timeout`` (pending data is kept)."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            if not self._fill(deadline):
                return False
        return True

    def request(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        host: str = "test.local",
        timeout: float | None = None,
    ) -> Response:
        """Send one well-formed request and read its final response."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{k}: {v}" for k, v in headers]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        return self.read_final_response(timeout)


def is_closed(sock: socket.socket, timeout: float = 2.0) -> bool:
    """Whether the peer of ``sock`` closes within ``timeout``; any data received is discarded."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        ready, _, _ = select.select([sock], [], [], remaining)
        if not ready:
            return False
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                return True
            raise


@dataclasses.dataclass
class Exchange:
    """What one raw conversation produced."""

    raw: bytes
    responses: list[Response]
    closed: bool

    @property
    def statuses(self) -> list[int]:
        """Status codes of every response, interim ones included."""
        return [r.status for r in self.responses]


def exchange(
    port: int,
    data: bytes,
    *,
    responses: int | None = None,
    timeout: float = 5.0,
    half_close: bool = False,
) -> Exchange:
    """Send ``data`` on a new connection and collect what comes back.

    With ``responses=None`` read until the server closes (``closed`` False if it did not within
    ``timeout``); otherwise stop once that many final (non-1xx) responses arrived, then check for
    a close for up to 0.2 s.  ``half_close`` shuts down our sending side after ``data``.
    """
    with RawClient(port, timeout=timeout) as client:
        try:
            client.send(data)
            if half_close:
                client.half_close()
        except (BrokenPipeError, ConnectionResetError):
            # The server may refuse and close before reading everything we send.
            pass
        got: list[Response] = []
        deadline = time.monotonic() + timeout
        finals = 0
        while responses is None or finals < responses:
            try:
                response, used = _parse_one(client.buffer, head_request=False, eof=client.eof)
            except IncompleteResponse:
                if client.eof or not client._fill(deadline):
                    break
                continue
            except ValueError:
                break
            client.buffer = client.buffer[used:]
            got.append(response)
            if response.status >= 200:
                finals += 1
        closed = client.eof or client.is_closed(0.2 if responses is not None else 0.0)
        return Exchange(raw=bytes(client.received), responses=got, closed=closed)


async def async_request(
    port: int,
    path: str,
    *,
    method: str = "GET",
    body: bytes = b"",
    host: str = "127.0.0.1",
    timeout: float = 30.0,
) -> Response:
    """One request on a new asyncio connection with ``Connection: close``; read until close.

    For many concurrent connections from one test process; raises ``OSError`` or
    ``TimeoutError`` on failure so that callers can count failed requests.
    """

    async def run() -> Response:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            head = (
                f"{method} {path} HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + body)
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        responses = [r for r in parse_responses(data) if r.status >= 200]
        if len(responses) != 1:
            raise ConnectionError(f"expected one response, got {data[:300]!r}")
        return responses[0]

    return await asyncio.wait_for(run(), timeout)


# ---------------------------------------------------------------------------------------------
# gunicorn subprocess


def _has_setting(name: str) -> bool:
    """Whether the installed gunicorn knows the setting ``name``."""
    from gunicorn.config import KNOWN_SETTINGS

    return any(setting.name == name for setting in KNOWN_SETTINGS)


class GunicornServer:
    """``python -m gunicorn -k async_handler.worker.AsyncioWorker`` on a free loopback port.

    ``app`` is a gunicorn app path (``module:callable``) importable from the repository root;
    ``args`` are extra gunicorn arguments and ``env`` extra environment variables.  The server is
    ready when :meth:`start` returns: the app's ``ready_path`` answered 200 (pass ``None`` to
    wait only for the port).
    """

    def __init__(
        self,
        app: str = CONTRACT_APP,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        *,
        worker_class: str = WORKER_CLASS,
        tls: tuple[Path, Path] | None = None,
        ready_path: str | None = "/pid",
        ready_timeout: float = 20.0,
        stop_timeout: float = 15.0,
    ) -> None:
        self.app = app
        self.args = list(args)
        self.extra_env = dict(env or {})
        self.worker_class = worker_class
        self.tls = tls
        self.ready_path = ready_path
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="ah-gunicorn-")
        self.dir = Path(self._tmp.name)
        self.log_path = self.dir / "gunicorn.log"
        self.call_log = self.dir / "calls.log"
        self.event_log = self.dir / "events.log"
        self.returncode: int | None = None

    # -- lifecycle

    @property
    def scheme(self) -> str:
        """``https`` when serving TLS, else ``http``."""
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        """The base URL, without a trailing slash."""
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def master_pid(self) -> int:
        """The gunicorn arbiter's pid."""
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def command(self) -> list[str]:
        """The gunicorn command line (for logs and error messages)."""
        cmd = [
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            self.worker_class,
            "-b",
            f"{self.host}:{self.port}",
            "--workers",
            "1",
            "--log-level",
            "info",
        ]
        if _has_setting("control_socket"):
            # gunicorn >= 24 listens on ~/.gunicorn/gunicorn.ctl by default: servers running side
            # by side would take it from each other.
            cmd += ["--control-socket", str(self.dir / "gunicorn.ctl")]
        if self.tls is not None:
            cmd += ["--certfile", str(self.tls[0]), "--keyfile", str(self.tls[1])]
        return [*cmd, *self.args, self.app]

    def start(self) -> GunicornServer:
        """Start gunicorn and wait until it serves; fail the test with the log tail if not."""
        self.port = free_port(self.host)
        env = dict(os.environ)
        env.update(
            {
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
                ),
                "PYTHONUNBUFFERED": "1",
                "TEST_APP_CALL_LOG": str(self.call_log),
                "TEST_APP_EVENT_LOG": str(self.event_log),
            }
        )
        env.update(self.extra_env)
        self.call_log.touch()
        self.event_log.touch()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group: a forced stop can reach orphaned workers too.
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        def ready(remaining: float) -> bool:
            if self.ready_path is None:
                return True
            try:
                with self.client(timeout=min(max(remaining, 0.1), 2.0)) as client:
                    client.send(f"GET {self.ready_path} HTTP/1.0\r\n\r\n".encode())
                    response: Response | None = client.read_final_response()
            except (OSError, pytest.fail.Exception):
                response = None
            return response is not None and response.status == 200

        wait_serving(
            self.proc,
            self.host,
            self.port,
            timeout=self.ready_timeout,
            name="gunicorn",
            log_text=self.log_tail,
            ready=ready,
        )

    def stop(self) -> int | None:
        """SIGTERM the arbiter; SIGKILL its process group after ``stop_timeout``. Idempotent."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if proc is not None:
            self.returncode = proc.returncode
            # Workers left behind by a killed arbiter would keep the port; reap the group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        return self.returncode

    def cleanup(self) -> None:
        """Stop the server and delete its temporary folder."""
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> GunicornServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- observation

    def log_text(self) -> str:
        """Everything gunicorn and the worker wrote so far."""
        try:
            return self.log_path.read_text("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the log, for failure messages."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in the log after offset ``start``."""
        found: list[re.Match[str]] = []

        def seen() -> bool:
            match = re.search(pattern, self.log_text()[start:])
            if match:
                found.append(match)
            return match is not None

        deadline = time.monotonic() + timeout
        while not seen():
            if time.monotonic() >= deadline:
                pytest.fail(f"log never matched {pattern!r}; tail:\n{self.log_tail()}")
            time.sleep(0.05)
        return found[0]

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the arbiter."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def tls_context(self) -> ssl.SSLContext | None:
        """A client context trusting nothing in particular (the test cert is self-signed)."""
        if self.tls is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.load_verify_locations(str(self.tls[0]))
        ctx.check_hostname = False
        return ctx

    def client(self, timeout: float = 10.0) -> RawClient:
        """A new raw connection to the server."""
        return RawClient(self.port, self.host, timeout=timeout, tls=self.tls_context())

    def get(
        self, path: str, headers: Sequence[tuple[str, str]] = (), timeout: float = 10.0
    ) -> Response:
        """One ``GET`` on a new connection (``Connection: close``); return the final response."""
        with self.client(timeout) as client:
            return client.request("GET", path, [*headers, ("Connection", "close")])

    def worker_pid(self, timeout: float = 10.0) -> int:
        """The pid of the worker that answers ``/pid`` now.

        The request is a bare ``GET /pid HTTP/1.0`` without header fields, so that it passes
        even the tightest ``limit_request_*`` settings a test configures.
        """
        with self.client(timeout) as client:
            client.send(b"GET /pid HTTP/1.0\r\n\r\n")
            response = client.read_final_response(timeout)
        assert response.status == 200, (response.status, response.body[:300])
        pid: int = response.json()["pid"]
        return pid

    def wait_for_new_worker(self, old_pid: int, timeout: float = 20.0) -> int:
        """Poll ``/pid`` until a worker other than ``old_pid`` answers; return its pid."""
        pids: list[int] = []

        def replaced() -> bool:
            try:
                pid = self.worker_pid(timeout=2.0)
            except (OSError, AssertionError, pytest.fail.Exception):
                return False
            pids.append(pid)
            return pid != old_pid

        wait_until(replaced, timeout, f"a worker other than {old_pid}; log:\n{self.log_tail()}")
        return pids[-1]

    # -- the apps' call log

    def call_mark(self) -> int:
        """A position in the call log; :meth:`calls_since` lists the calls after it."""
        return self.call_log.stat().st_size

    def calls_since(self, mark: int) -> list[str]:
        """The app calls (``METHOD PATH`` lines) logged after ``mark``."""
        with self.call_log.open("rb") as f:
            f.seek(mark)
            return f.read().decode("latin-1").splitlines()

    def events(self) -> list[str]:
        """Lines the apps wrote to the event log (cancellation probes and the like)."""
        return self.event_log.read_text("latin-1").splitlines()

    def assert_app_not_called(self, mark: int, worker_pid: int) -> None:
        """Prove nothing reached the app since ``mark`` and the same worker still serves.

        A ``GET /pid`` serves as the sentinel: it must be the only call logged since ``mark``.
        """
        pid = self.worker_pid()
        assert pid == worker_pid, f"worker changed from {worker_pid} to {pid}:\n{self.log_tail()}"
        calls = self.calls_since(mark)
        assert calls == ["GET /pid"], f"the app was called: {calls!r}"


@contextlib.contextmanager
def gunicorn_server(
    app: str = CONTRACT_APP,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> Iterator[GunicornServer]:
    """Context manager form of :class:`GunicornServer` (for fixtures: ``yield from``)."""
    server = GunicornServer(app, args, env, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def make_self_signed_cert(directory: Path, openssl: str) -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1 with the ``openssl`` CLI; return paths."""
    cert = directory / "cert.pem"
    key = directory / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key
