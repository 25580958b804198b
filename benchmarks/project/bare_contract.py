"""A trivial application honouring the server contract, without Django.

With Django out of the picture, serving it measures our worker alone (protocol, loop, contract
dispatch); ``bare_asgi.py`` is the same response for an ASGI server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from async_handler.contract import ASYNC_KEY

BODY = b"Hello, world!"
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]

StartResponse = Callable[..., Any]


class HelloApplication:
    """Answers ``Hello, world!``: awaitable under the contract, plain WSGI otherwise."""

    async_handler_awaitable = True

    def __call__(
        self, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes] | Awaitable[Iterable[bytes]]:
        if environ.get(ASYNC_KEY):
            return self._respond(start_response)
        start_response("200 OK", HEADERS)
        return [BODY]

    async def _respond(self, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", HEADERS)
        return [BODY]


application = HelloApplication()
