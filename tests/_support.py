"""Small helpers shared by the end-to-end tests: ports, required programs, the shared folder.

Nothing here starts a server (that is :mod:`tests.server`); these are the pieces a test needs to
decide whether it can run at all, and to wait for a socket without fixed sleeps.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "REDIS",
    "REPO_ROOT",
    "SHARED",
    "flush_redis_prefix",
    "free_port",
    "missing",
    "on_ci",
    "pg_admin_connect",
    "raise_nofile_limit",
    "require_program",
    "require_redis",
    "require_shared",
    "wait_for_port",
    "wait_serving",
]

#: The repository root (the folder holding ``async_handler/`` and ``tests/``).
REPO_ROOT = Path(__file__).resolve().parents[1]

#: The Redis server of the channels_redis tests.
REDIS = ("127.0.0.1", 6379)

#: ``../shared`` beside the repository root: read-only project material (request corpus).
SHARED = Path(__file__).resolve().parents[2] / "shared"


def on_ci() -> bool:
    """Whether the tests run on CI, where a missing prerequisite is a failure, not a skip."""
    return os.environ.get("CI", "").lower() == "true"


def missing(reason: str) -> None:
    """Skip the calling test loudly, or fail it on CI, because a prerequisite is absent."""
    if on_ci():
        pytest.fail(f"{reason} (CI=true: a missing prerequisite fails the build)")
    pytest.skip(f"SKIPPED, NOT TESTED: {reason}; CI fails here")


def require_program(name: str, hint: str | None = None) -> str:
    """Return the path of the system program ``name``; skip (locally) or fail (CI) if absent.

    ``hint`` names how to install it; it defaults to ``apt-get install <name>``.
    """
    path = shutil.which(name)
    if path is None:
        missing(f"{name} not installed: {hint or f'apt-get install {name}'}")
        raise AssertionError("unreachable")  # missing() always raises
    return path


def require_shared(*parts: str) -> Path:
    """Return ``SHARED / parts``; skip (locally) or fail (CI) when it does not exist."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        missing(f"{path} is absent (the ../shared folder beside the repository)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago (the kernel picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    """Poll until a TCP connect to ``(host, port)`` succeeds; return False after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def wait_serving(
    proc: subprocess.Popen[bytes] | None,
    host: str,
    port: int,
    *,
    timeout: float,
    name: str,
    log_text: Callable[[], str],
    ready: Callable[[float], bool],
) -> None:
    """Poll until a server process answers ``ready(remaining_seconds)``; fail the test with
    ``log_text()`` if the process exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{name} exited with {proc.returncode} before serving:\n{log_text()}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"{name} did not serve within {timeout}s:\n{log_text()}")
        if wait_for_port(host, port, min(remaining, 0.5)):
            if ready(remaining):
                return
            time.sleep(0.05)


def raise_nofile_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE to at least ``wanted`` (bounded by the hard limit).

    Children (gunicorn) inherit it.  Returns the new soft limit; skips the calling test loudly
    (fails on CI) if the hard limit is too low.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        missing(f"RLIMIT_NOFILE hard limit {hard} < {wanted}: raise it (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


def pg_admin_connect() -> Any:
    """An autocommit psycopg connection to the test PostgreSQL (127.0.0.1:5432, database
    ``test``); skips loudly, or fails on CI, when psycopg or the server is absent."""
    try:
        import psycopg
    except ImportError:
        missing("psycopg is not installed (pip install 'psycopg[binary]')")
        raise
    try:
        return psycopg.connect(
            host="127.0.0.1",
            port=5432,
            dbname="test",
            user="postgres",
            autocommit=True,
            connect_timeout=3,
        )
    except psycopg.OperationalError as exc:
        missing(f"PostgreSQL is not reachable on 127.0.0.1:5432 database 'test': {exc}")
        raise


def require_redis() -> None:
    """Skip loudly (fail on CI) unless channels_redis is installed and Redis answers at
    :data:`REDIS`."""
    try:
        import channels_redis  # noqa: F401
    except ImportError:
        missing("channels_redis not installed: pip install 'django-async-handler[redis]'")
    try:
        socket.create_connection(REDIS, timeout=1).close()
    except OSError:
        missing(f"Redis not reachable at {REDIS}")


def flush_redis_prefix(prefix: str) -> None:
    """Delete every Redis key under ``prefix``: what a test run with its own unique prefix (so
    that parallel runs stay apart) left behind."""
    import redis

    client = redis.Redis(*REDIS)
    try:
        keys = list(client.scan_iter(f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
