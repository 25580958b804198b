"""Plain PEP 3333 applications (no contract attribute): the worker runs them in a pool thread.

``app``        ``/pid``, ``/sleep?s=N`` (``time.sleep``), anything else echoes the request.
``write_app``  answers through the legacy ``write()`` callable returned by ``start_response``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from tests.apps.common import echo_payload, json_body, log_call, query_float, read_input

StartResponse = Callable[..., Callable[[bytes], Any]]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """A bare WSGI callable."""
    log_call(environ)
    path = environ.get("PATH_INFO", "")
    if path == "/pid":
        headers, body = json_body({"pid": os.getpid()})
    elif path == "/sleep":
        time.sleep(query_float(environ, "s", 1.0))
        headers, body = json_body({"slept": True})
    else:
        headers, body = json_body(echo_payload(environ, read_input(environ)))
    start_response("200 OK", headers)
    return body


def write_app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """Send most of the body through ``write()`` (PEP 3333's imperative API), the rest returned."""
    log_call(environ)
    if environ.get("PATH_INFO") == "/pid":
        headers, body = json_body({"pid": os.getpid()})
        start_response("200 OK", headers)
        return body
    write = start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "21")])
    write(b"written ")
    write(b"by write()")
    return [b" ok"]
