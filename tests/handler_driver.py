"""In-process drivers: one request through a WSGI callable, in either mode of the contract."""

from __future__ import annotations

import io
import re
import sys
from dataclasses import dataclass, field
from typing import Any
from wsgiref.util import FileWrapper

from async_handler.contract import ASYNC_KEY

# Headers a server owns or that legitimately differ per run (RFC 9110 §6.6.1 Date, framing).
VOLATILE = {"date", "server", "content-length", "transfer-encoding", "connection"}

# A cookie's expires= is computed from the clock when Max-Age is set: two runs a second apart
# differ there and nowhere else.
_EXPIRES = re.compile(r"expires=[^;]*", re.IGNORECASE)


@dataclass
class Result:
    status: str
    headers: list[tuple[str, str]]
    body: bytes
    closed: bool = field(default=False)

    def comparable(self) -> tuple[str, list[tuple[str, str]], bytes]:
        headers = sorted(
            (k.lower(), _EXPIRES.sub("expires=*", v) if k.lower() == "set-cookie" else v)
            for k, v in self.headers
            if k.lower() not in VOLATILE
        )
        return self.status, headers, self.body


def make_environ(
    method: str = "GET",
    path: str = "/",
    query: str = "",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    content_type: str | None = None,
) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "50000",
        "HTTP_HOST": "testserver",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": FileWrapper,
        "CONTENT_LENGTH": str(len(body)) if body else "",
    }
    if content_type is not None:
        environ["CONTENT_TYPE"] = content_type
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


class _StartResponse:
    def __init__(self) -> None:
        self.status = ""
        self.headers: list[tuple[str, str]] = []

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        self.status, self.headers = status, list(headers)
        return lambda data: None


def run_wsgi(app: Any, environ: dict[str, Any]) -> Result:
    """Drive ``app`` as a plain WSGI server would (no contract marker)."""
    start = _StartResponse()
    body = app(environ, start)
    try:
        data = b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return Result(start.status, start.headers, data, closed=True)


async def run_async(app: Any, environ: dict[str, Any], pool: Any = None) -> Result:
    """Drive ``app`` as a loop-owning server would (contract marker set)."""
    environ = dict(environ, **{ASYNC_KEY: True})
    if pool is not None:
        environ["async_handler.thread_pool"] = pool
    start = _StartResponse()
    body = await app(environ, start)
    chunks: list[bytes] = []
    try:
        if hasattr(body, "__aiter__"):
            async for chunk in body:
                chunks.append(chunk)
        else:
            for chunk in body:
                chunks.append(chunk)
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()
        else:
            body.close()
    return Result(start.status, start.headers, b"".join(chunks), closed=True)
