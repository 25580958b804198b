"""Run the montage example (``examples/montage``) for end-to-end tests.

:class:`MontageSite` is one throw-away installation of the example: its own SQLite file (through
the ``MONTAGE_DB`` variable its settings read), migrated, optionally with a superuser, and
optionally its own copy of the project source (so a test may edit a view and watch the
autoreloader pick it up without touching the repository).  From it a test starts

* the example under our gunicorn worker (:meth:`MontageSite.gunicorn`, a
  :class:`tests.server.GunicornServer` with ``--chdir`` into the project), or
* ``manage.py runserver`` (:meth:`MontageSite.runserver`, a :class:`RunserverProcess`).

Every wait polls with a deadline; nothing sleeps a fixed time for readiness.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx
import pytest

from tests._support import REPO_ROOT, free_port, wait_serving
from tests.server import GunicornServer

__all__ = ["MONTAGE_DIR", "MontageSite", "RunserverProcess"]

MONTAGE_DIR = REPO_ROOT / "examples" / "montage"

#: Paths that are not the project: runtime files of a developer's own checkout.
_NOT_SOURCE = shutil.ignore_patterns("__pycache__", "*.pyc", "db.sqlite3*", "media", "staticfiles")


class MontageSite:
    """One installation of the montage example with a fresh database under ``directory``.

    With ``copy_source`` the project is copied into ``directory/montage`` first and every
    command runs from the copy.
    """

    def __init__(self, directory: Path, *, copy_source: bool = False) -> None:
        self.directory = directory
        if copy_source:
            self.project = directory / "montage"
            shutil.copytree(MONTAGE_DIR, self.project, ignore=_NOT_SOURCE)
        else:
            self.project = MONTAGE_DIR
        self.db = directory / "montage.sqlite3"
        self.env = {
            "MONTAGE_DB": str(self.db),
            "MONTAGE_DEBUG": "1",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
            "PYTHONUNBUFFERED": "1",
            # The project's settings module, never one a test process may have exported.
            "DJANGO_SETTINGS_MODULE": "montage.settings",
        }

    def process_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for a subprocess of this site."""
        env = dict(os.environ)
        env.update(self.env)
        env.update(extra or {})
        return env

    def manage(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``manage.py *args`` to completion; fail the test with its output if it fails."""
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=self.project,
            env=self.process_env(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            pytest.fail(
                f"manage.py {' '.join(args)} exited with {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def migrate(self) -> None:
        """Create the database tables."""
        self.manage("migrate", "--noinput", "-v", "0")

    def create_superuser(self, username: str, password: str) -> None:
        """Create a superuser non-interactively (``DJANGO_SUPERUSER_PASSWORD``)."""
        self.manage(
            "createsuperuser",
            "--noinput",
            "--username",
            username,
            "--email",
            f"{username}@example.com",
            env={"DJANGO_SUPERUSER_PASSWORD": password},
        )

    def gunicorn(
        self, args: Sequence[str] = (), env: dict[str, str] | None = None
    ) -> GunicornServer:
        """A (not yet started) gunicorn serving this site with the ``AsyncioWorker``."""
        return GunicornServer(
            "montage.wsgi:application",
            ["--chdir", str(self.project), *args],
            {**self.env, **(env or {})},
            ready_path="/request-info/",
        )

    def runserver(self, *args: str, env: dict[str, str] | None = None) -> RunserverProcess:
        """A (not yet started) ``manage.py runserver`` of this site on a free port."""
        return RunserverProcess(self, args, env)


class RunserverProcess:
    """``manage.py runserver <host>:<port> *args`` in its own process group.

    ``port`` defaults to a free one.  With ``addrport=False`` no address argument is added
    (``args`` carry their own; ``host`` and ``port`` must match it).  The command's output goes
    to a log file; :meth:`start` returns once ``ready_path`` answers 200.
    """

    def __init__(
        self,
        site: MontageSite,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        addrport: bool = True,
        ready_path: str = "/request-info/",
        ready_timeout: float = 30.0,
    ) -> None:
        self.site = site
        self.args = list(args)
        self.extra_env = dict(env or {})
        self.host = host
        self.port = port or free_port(host)
        self.addrport = addrport
        self.ready_path = ready_path
        self.ready_timeout = ready_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="ah-runserver-")
        self.log_path = Path(self._tmp.name) / "runserver.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The base URL, without a trailing slash."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        """The command line."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        addr = [f"{host}:{self.port}"] if self.addrport else []
        return [sys.executable, "manage.py", "runserver", *addr, *self.args]

    def start(self, *, wait: bool = True) -> RunserverProcess:
        """Start the command; with ``wait``, return once it serves (fail the test if not)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.site.project,
                env=self.site.process_env(self.extra_env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group: the autoreloader's child must stop with its parent.
                start_new_session=True,
            )
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise
        return self

    def wait_ready(self) -> None:
        """Poll ``ready_path`` until it answers 200."""

        def ready(remaining: float) -> bool:
            try:
                return httpx.get(self.url + self.ready_path, timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_serving(
            self.proc,
            self.host,
            self.port,
            timeout=self.ready_timeout,
            name="runserver",
            log_text=self.log_text,
            ready=ready,
        )

    def wait_exit(self, timeout: float) -> int:
        """Wait for the command to exit by itself; return its exit code."""
        assert self.proc is not None, "runserver not started"
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"runserver still running after {timeout}s:\n{self.log_text()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGINT the process group (CONTROL-C), SIGKILL it after ``timeout``. Idempotent."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # The autoreloader's child may outlive its parent; the group goes either way.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def cleanup(self) -> None:
        """Stop the server and remove its log."""
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> RunserverProcess:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def log_text(self) -> str:
        """Everything the command printed so far."""
        try:
            return self.log_path.read_text("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until the regex ``pattern`` matches the output; fail the test after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log_text())
            if match is not None:
                return match
            if time.monotonic() >= deadline:
                pytest.fail(f"runserver output never matched {pattern!r}:\n{self.log_text()}")
            time.sleep(0.05)
