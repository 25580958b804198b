"""The handshake of :mod:`async_handler.websocket.testing`: its environ and its answer.

Layer: stdlib and the contract.
"""

from __future__ import annotations

import base64
import enum
import io
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from ..contract import ASYNC_KEY

__all__ = ["SAME_ORIGIN", "HandshakeRejected", "HandshakeResponse", "handshake_environ"]


class _Origin(enum.Enum):
    SAME = "the site's own origin"


#: The default ``origin``: the site's own, as a browser sends it from one of the site's pages.
SAME_ORIGIN: Literal[_Origin.SAME] = _Origin.SAME


@dataclass(frozen=True)
class HandshakeResponse:
    """The HTTP answer to the handshake: the 101, or the response that refused it."""

    status_code: int
    reason_phrase: str
    headers: tuple[tuple[str, str], ...]
    content: bytes = b""

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (case-insensitive), else ``default``."""
        values = self.get_all(name)
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in order (``Set-Cookie``)."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self.get_all(name))


class HandshakeRejected(Exception):
    """The application answered the handshake with an HTTP response instead of a 101."""

    def __init__(self, path: str, response: HandshakeResponse) -> None:
        super().__init__(path, response)
        self.path = path
        self.response = response

    @property
    def status_code(self) -> int:
        """The refusing response's status."""
        return self.response.status_code

    def __str__(self) -> str:
        response = self.response
        return (
            f"WebSocket handshake to {self.path} refused with {response.status_code} "
            f"{response.reason_phrase}: {response.content[:200]!r}"
        )


def handshake_environ(
    path: str,
    *,
    client: Any,
    headers: Iterable[tuple[str, str]],
    subprotocols: Sequence[str],
    origin: str | Literal[_Origin.SAME] | None,
    secure: bool,
) -> dict[str, Any]:
    """The environ our worker builds for a handshake to ``path`` (``async_handler.http.
    request``), with the names and values of Django's ``RequestFactory`` (``testserver``),
    ``client``'s cookies and WSGI-named defaults, and :data:`ASYNC_KEY`; the caller adds
    :data:`WEBSOCKET_KEY`."""
    target = urlsplit(path)
    scheme = "https" if secure else "http"
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote(target.path or "/", "latin-1"),
        "QUERY_STRING": target.query,
        "RAW_URI": path,
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "443" if secure else "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "50000",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scheme,
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if client is not None:
        environ.update(
            (key, value)
            for key, value in getattr(client, "defaults", {}).items()
            if isinstance(key, str) and key.isupper()  # WSGI names, not ASGI scope keys
        )
        cookies = client.cookies.values()
        if cookies:
            environ["HTTP_COOKIE"] = "; ".join(
                sorted(f"{morsel.key}={morsel.coded_value}" for morsel in cookies)
            )
    for name, value in headers:
        key = "HTTP_" + name.upper().replace("-", "_")
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    environ.update(
        HTTP_UPGRADE="websocket",
        HTTP_CONNECTION="Upgrade",
        HTTP_SEC_WEBSOCKET_KEY=base64.b64encode(os.urandom(16)).decode("ascii"),
        HTTP_SEC_WEBSOCKET_VERSION="13",
    )
    if subprotocols:
        environ["HTTP_SEC_WEBSOCKET_PROTOCOL"] = ", ".join(subprotocols)
    if origin is SAME_ORIGIN:
        host = environ.get("HTTP_HOST")
        if host is None:
            port = environ["SERVER_PORT"]
            default = "443" if secure else "80"
            host = environ["SERVER_NAME"] + ("" if port == default else f":{port}")
        environ["HTTP_ORIGIN"] = f"{scheme}://{host}"
    elif origin is not None:
        environ["HTTP_ORIGIN"] = origin
    environ[ASYNC_KEY] = True
    return environ
