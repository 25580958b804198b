"""WebSocket views under ``manage.py runserver``: ours serves them through the same protocol code
as the gunicorn worker; Django's own server (``--wsgi``) answers a handshake with 426.

The test project runs with tests/djproject/settings_runserver.py (``async_handler`` installed,
``WSGI_APPLICATION`` set) from the repository root, as ``python -m django runserver``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.montage_harness import RunserverProcess
from tests.ws_raw import handshake

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parent.parent


class _Project:
    """What :class:`RunserverProcess` needs of a site, for the test project."""

    project = REPO_ROOT

    def __init__(self, directory: Path) -> None:
        self.env = {
            "DJANGO_SETTINGS_MODULE": "tests.djproject.settings_runserver",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
            "PYTHONUNBUFFERED": "1",
            "TEST_APP_EVENT_LOG": str(directory / "events.log"),
        }

    def process_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env.update(extra or {})
        return env


class _Runserver(RunserverProcess):
    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "django",
            "runserver",
            f"{self.host}:{self.port}",
            *self.args,
        ]


@pytest.fixture
def project(tmp_path: Path) -> _Project:
    return _Project(tmp_path)


def _runserver(project: _Project, *args: str, env: dict[str, str] | None = None) -> _Runserver:
    return _Runserver(project, args, env, ready_path="/async/hello/")  # type: ignore[arg-type]


@pytest.fixture
def runserver(project: _Project) -> Iterator[_Runserver]:
    with _runserver(project, "--noreload") as server:
        yield server


def test_echo_under_runserver(runserver: _Runserver) -> None:
    async def main() -> int | None:
        async with connect(f"ws://{runserver.host}:{runserver.port}/ws/echo/") as ws:
            assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
            await ws.send("under runserver")
            assert await ws.recv() == "under runserver"
            await ws.send(b"\x00\x01")
            assert await ws.recv() == b"\x00\x01"
        return ws.close_code

    assert asyncio.run(main()) == 1000
    # The socket's request is logged once it ends, as its 101.
    runserver.wait_for_log(r'"GET /ws/echo/ HTTP/1\.1" 101 ')


def test_control_c_closes_an_open_socket_with_1001_and_stops_promptly(
    runserver: _Runserver,
) -> None:
    async def main() -> tuple[int | None, float, int]:
        async with connect(f"ws://{runserver.host}:{runserver.port}/ws/echo/") as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            assert runserver.proc is not None
            started = time.monotonic()
            runserver.proc.send_signal(signal.SIGINT)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            code = ws.close_code
        returncode = await asyncio.to_thread(runserver.wait_exit, 10.0)
        return code, time.monotonic() - started, returncode

    code, elapsed, returncode = asyncio.run(main())
    # The development server stops for good: 1001 Going Away (gunicorn's stop says 1012).
    assert code == 1001
    assert returncode == 0, runserver.log_text()
    assert elapsed < 4.0, f"runserver took {elapsed:.2f}s to stop"
    assert "Traceback" not in runserver.log_text()


def test_under_the_autoreloader_ctrl_c_closes_with_1001_and_a_reload_with_1012(
    project: _Project, tmp_path: Path
) -> None:
    # The serving thread is a daemon there: without the exit hook the interpreter would cut
    # every socket (1006) on Ctrl-C and on each reload.
    watched = tmp_path / "watched_by_reloader.py"
    watched.write_text("VERSION = 1\n")
    env = {
        "DJPROJECT_WATCHED_MODULE": "watched_by_reloader",
        "PYTHONPATH": os.pathsep.join((str(tmp_path), project.env["PYTHONPATH"])),
    }
    with _runserver(project, env=env) as server:
        url = f"ws://{server.host}:{server.port}/ws/echo/"

        async def reload() -> int | None:
            async with connect(url) as ws:
                await ws.send("before")
                assert await ws.recv() == "before"
                time.sleep(1.1)  # a new mtime, whatever the file system's resolution
                watched.write_text("VERSION = 2\n")
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 15)
                return ws.close_code

        assert asyncio.run(reload()) == 1012
        server.wait_ready()  # the reloaded process serves

        async def stop() -> int | None:
            async with connect(url) as ws:
                await ws.send("after")
                assert await ws.recv() == "after"
                assert server.proc is not None
                os.killpg(server.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the group
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)
                return ws.close_code

        assert asyncio.run(stop()) == 1001
        assert server.wait_exit(10.0) == 0
        assert "Traceback" not in server.log_text()


def test_djangos_own_server_answers_a_handshake_with_426(project: _Project) -> None:
    with _runserver(project, "--noreload", "--wsgi") as server:
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(handshake("/ws/echo/"))
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
            while len(body) < length:
                chunk = sock.recv(65536)
                assert chunk, answer + body
                body += chunk
        assert head.startswith(b"HTTP/1.1 426 "), answer
        assert b"WSGIServer" in head  # Django's server, not ours
        # PEP 3333 forbids hop-by-hop fields to applications (wsgiref fails the response).
        assert b"\r\nupgrade:" not in head.lower()
        assert b"-k async_handler.worker.AsyncioWorker" in body
        assert b"manage.py runserver with 'async_handler'" in body
        assert "Traceback" not in server.log_text()
