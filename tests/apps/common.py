"""Pieces shared by the test applications: the call log, the event log, the echo payload."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from typing import Any

__all__ = [
    "echo_payload",
    "json_body",
    "log_call",
    "log_event",
    "query_float",
    "query_params",
    "read_input",
]

StartResponse = Callable[..., Callable[[bytes], Any]]

# Bodies up to this size are echoed back verbatim; bigger ones only by length and hash.
ECHO_BODY_LIMIT = 1 << 20

_fds: dict[tuple[int, str], int] = {}
_fds_lock = threading.Lock()


def _append(variable: str, line: str) -> None:
    """Append ``line`` to the file named by env ``variable``, if set.

    One ``os.write`` on an ``O_APPEND`` descriptor per line keeps lines whole when threads or
    processes write at once; the descriptor is per process because workers fork.
    """
    path = os.environ.get(variable)
    if not path:
        return
    key = (os.getpid(), variable)
    with _fds_lock:
        fd = _fds.get(key)
        if fd is None:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            _fds[key] = fd
    data = line.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n") + "\n"
    os.write(fd, data.encode("latin-1", "backslashreplace"))


def log_call(environ: dict[str, Any]) -> None:
    """Record that the application was called, as ``METHOD PATH_INFO``."""
    _append("TEST_APP_CALL_LOG", f"{environ.get('REQUEST_METHOD')} {environ.get('PATH_INFO')}")


def log_event(text: str) -> None:
    """Record an application event (for example ``cancelled <id>``) for the test to read."""
    _append("TEST_APP_EVENT_LOG", text)


def query_params(environ: dict[str, Any]) -> dict[str, str]:
    """The query string as a dict (last value wins)."""
    from urllib.parse import parse_qsl

    return dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))


def query_float(environ: dict[str, Any], name: str, default: float) -> float:
    """A float query parameter; a malformed value is a test bug, so it raises."""
    value = query_params(environ).get(name)
    return default if value is None else float(value)


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def echo_payload(environ: dict[str, Any], body: bytes) -> dict[str, Any]:
    """Everything a test may assert about the request as the application saw it."""
    scalar_environ = {k: v for k, v in environ.items() if _jsonable(v)}
    return {
        "pid": os.getpid(),
        "method": environ.get("REQUEST_METHOD"),
        "path": environ.get("PATH_INFO"),
        "script_name": environ.get("SCRIPT_NAME"),
        "query": environ.get("QUERY_STRING"),
        "raw_uri": environ.get("RAW_URI"),
        "protocol": environ.get("SERVER_PROTOCOL"),
        "scheme": environ.get("wsgi.url_scheme"),
        "content_length": environ.get("CONTENT_LENGTH"),
        "content_type": environ.get("CONTENT_TYPE"),
        "headers": {k: v for k, v in environ.items() if k.startswith("HTTP_")},
        "environ": scalar_environ,
        "environ_keys": sorted(environ),
        "wsgi_version": list(environ.get("wsgi.version", ())),
        "body_length": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "body": body.decode("latin-1") if len(body) <= ECHO_BODY_LIMIT else None,
        "thread": threading.current_thread().name,
    }


def json_body(obj: Any) -> tuple[list[tuple[str, str]], list[bytes]]:
    """Response headers and body for ``obj`` as JSON."""
    data = json.dumps(obj, default=repr).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    return headers, [data]


def read_input(environ: dict[str, Any]) -> bytes:
    """Read the whole request body from ``wsgi.input`` (blocking: call it off the loop)."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        return bytes(stream.read(int(length)))
    chunks: list[bytes] = []
    while True:
        chunk = stream.read(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
