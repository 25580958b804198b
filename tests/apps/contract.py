"""An application honouring the server contract (:mod:`async_handler.contract`).

``app`` is awaited on the worker's loop when the server sets ``environ["async_handler.async"]``;
without the key it answers as a plain WSGI application (running its coroutine to completion on a
private loop), as the contract requires.  Routes (any other path echoes the request):

``/pid``                 ``{"pid": <worker pid>}``
``/echo`` (and any path) the request as seen by the app (:func:`tests.apps.common.echo_payload`)
``/sleep?s=1``           ``asyncio.sleep`` on the loop
``/sync-sleep?s=2``      ``time.sleep`` in the server's thread pool (a "sync view")
``/block?s=N``           ``time.sleep`` *on the loop*: blocks the worker (for the arbiter timeout)
``/stream?n=5``          an async generator body of ``n`` lines, no Content-Length
``/file?path=P``         ``environ["wsgi.file_wrapper"](open(P, "rb"))``
``/stats``               ``async_handler.protocol.STATS`` as JSON
``/cancel-probe?id=X``   logs ``started X``, sleeps 60 s; logs ``cancelled X`` on cancellation
``/bad-header``          a response header value containing CR LF (the server must refuse it)
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from async_handler.contract import ASYNC_KEY, POOL_KEY
from tests.apps.common import (
    echo_payload,
    json_body,
    log_call,
    log_event,
    query_float,
    query_params,
    read_input,
)

StartResponse = Callable[..., Callable[[bytes], Any]]
Body = Iterable[bytes] | AsyncIterator[bytes]


async def _off_loop(environ: dict[str, Any], fn: Callable[..., Any], *args: Any) -> Any:
    """Run blocking ``fn`` in the server's pool when it offers one, else in asyncio's."""
    pool = environ.get(POOL_KEY)
    if pool is not None:
        return await asyncio.wrap_future(pool.run(fn, *args))
    return await asyncio.to_thread(fn, *args)


def _stats() -> Any:
    from async_handler import protocol

    stats: Any = getattr(protocol, "STATS", None)
    if stats is None:
        return {"error": "async_handler.protocol has no STATS"}
    if isinstance(stats, dict):
        return dict(stats)
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return dataclasses.asdict(stats)
    if hasattr(stats, "__dict__"):
        return dict(vars(stats))
    if hasattr(stats, "__slots__"):
        return {name: getattr(stats, name) for name in stats.__slots__}
    return {"repr": repr(stats)}


async def _stream(n: int) -> AsyncIterator[bytes]:
    for i in range(n):
        yield f"line {i}\n".encode()
        await asyncio.sleep(0)


class ContractApp:
    """The test application; ``async_handler_awaitable`` opts in to the server contract."""

    async_handler_awaitable = True

    def __call__(
        self, environ: dict[str, Any], start_response: StartResponse
    ) -> Awaitable[Body] | Iterable[bytes]:
        """With the contract key, return a coroutine (the body is its result); else a body."""
        log_call(environ)
        if environ.get(ASYNC_KEY):
            return self.handle(environ, start_response)
        # Plain PEP 3333 call: run the same handler on a private loop, materialising the body.
        return asyncio.run(self._handle_sync(environ, start_response))

    async def _handle_sync(
        self, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        body = await self.handle(environ, start_response)
        if isinstance(body, AsyncIterator):
            return [chunk async for chunk in body]
        return body

    async def handle(self, environ: dict[str, Any], start_response: StartResponse) -> Body:
        """Serve one request; runs on the server's loop when called through the contract."""
        path = environ.get("PATH_INFO", "")
        if path == "/pid":
            headers, body = json_body({"pid": os.getpid()})
            start_response("200 OK", headers)
            return body
        if path == "/sleep":
            await asyncio.sleep(query_float(environ, "s", 1.0))
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
            return [b"slept"]
        if path == "/sync-sleep":
            await _off_loop(environ, time.sleep, query_float(environ, "s", 2.0))
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "10")])
            return [b"slept sync"]
        if path == "/block":
            # Deliberately blocks the event loop: the arbiter must notice the silent worker.
            time.sleep(query_float(environ, "s", 5.0))
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "7")])
            return [b"blocked"]
        if path == "/stream":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return _stream(int(query_float(environ, "n", 5)))
        if path == "/file":
            # Not a with-block: the server closes the file through the wrapper (PEP 3333).
            handle = open(query_params(environ)["path"], "rb")
            start_response(
                "200 OK",
                [
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Length", str(os.fstat(handle.fileno()).st_size)),
                ],
            )
            wrapper: Iterable[bytes] = environ["wsgi.file_wrapper"](handle)
            return wrapper
        if path == "/stats":
            headers, body = json_body(_stats())
            start_response("200 OK", headers)
            return body
        if path == "/cancel-probe":
            probe = query_params(environ).get("id", "-")
            log_event(f"started {probe}")
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                log_event(f"cancelled {probe}")
                raise
            log_event(f"finished {probe}")
            start_response("200 OK", [("Content-Length", "8")])
            return [b"finished"]
        if path == "/bad-header":
            start_response(
                "200 OK",
                [("Content-Length", "9"), ("X-Evil", "a\r\nX-Injected: 1")],
            )
            return [b"malicious"]
        body_bytes: bytes = await _off_loop(environ, read_input, environ)
        headers, body = json_body(echo_payload(environ, body_bytes))
        start_response("200 OK", headers)
        return body


app = ContractApp()
