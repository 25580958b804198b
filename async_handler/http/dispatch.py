"""Running one request: the application on the loop (contract apps) or on a leased pool thread,
the hooks, and the errors it may end in (500, 503 on ``request_timeout``, a close)."""

from __future__ import annotations

import asyncio
import http
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httptools

from ..contract import ASYNC_KEY, POOL_KEY, WEBSOCKET_KEY
from ..threads import Lease, ThreadPool
from .fields import error_response
from .response import ClientDisconnected, RequestCycle, _BadResponse, _BrokenFraming

if TYPE_CHECKING:
    from .connection import HttpProtocol
    from .websocket import WebSocket

_INTERNAL_ERROR = "500 Internal Server Error"
_CLIENT_GONE = "499 Client Closed Request"

# After a 101 every read goes to the WebSocket and the connection's parser is never fed again;
# this inert one stands in for all of them, since each parser is about 900 bytes (and holds a
# reference back to its connection) for as long as the socket lives.
_SPENT_PARSER = httptools.HttpRequestParser(object())


class Dispatcher:
    """Runs the application for a request, mixed into the connection."""

    __slots__ = ()  # the connection declares them

    # per connection (set in HttpProtocol.__init__; typed here)
    _after_upgrade: bytearray | None
    websocket: WebSocket | None
    _headers: list[tuple[bytes, bytes]]
    _url: list[bytes]

    # -- running one request

    async def _serve(self: HttpProtocol, cycle: RequestCycle) -> None:  # type: ignore[misc]
        environ = cycle.environ
        try:
            try:
                hook = self.state.on_request_start
                if hook is not None:
                    hook(environ)
                if self._async_app:
                    await self._run_async(cycle)
                else:
                    await self._run_sync(cycle)
            except asyncio.CancelledError:
                if self.flow.lost:
                    return  # the client left; the application saw the cancellation
                if not cycle.timed_out:
                    raise
                task = cycle.task
                uncancel = getattr(task, "uncancel", None)
                if uncancel is not None:
                    uncancel()
                self.log.warning(
                    "Request timed out after %ss without a response: %s %s",
                    cycle.timeout,
                    cycle.method,
                    environ.get("RAW_URI", ""),
                )
                self._answer_error(cycle, 503, "Request timed out")
            except ClientDisconnected:
                if not self.flow.lost:
                    self._close()
            except _BadResponse as exc:
                self.log.error(
                    "Refusing to send an invalid response to %s %s: %s",
                    cycle.method,
                    environ.get("RAW_URI", ""),
                    exc,
                )
                self._answer_error(cycle, 500, "Internal Server Error")
            except _BrokenFraming:
                self._close()
            except Exception as exc:
                if isinstance(exc, ConnectionError) and self.flow.lost:
                    return  # a send raced the disconnect; nobody is left to answer
                self.log.exception(
                    "Error handling request %s %s", cycle.method, environ.get("RAW_URI", "")
                )
                self._answer_error(cycle, 500, "Internal Server Error")
        finally:
            self._request_ended(cycle)

    def _answer_error(self: HttpProtocol, cycle: RequestCycle, status: int, reason: str) -> None:  # type: ignore[misc]
        cycle.keep_alive = False
        if self.flow.lost or self.transport.is_closing():
            return
        if cycle.headers_sent:
            # Part of the response is out: only closing tells the client it is incomplete.
            self._close()
            return
        state = self.state
        payload = error_response(status, reason, state.date.line(), state.server_header)
        self.transport.write(payload)
        cycle.headers_sent = True
        cycle.finished = True
        cycle.status = f"{status} {http.HTTPStatus(status).phrase}"
        cycle.headers = [("Content-Type", "text/plain; charset=utf-8")]
        cycle.bytes_sent = len(reason.encode()) + 1

    def _request_ended(self: HttpProtocol, cycle: RequestCycle) -> None:  # type: ignore[misc]
        handle = cycle.timeout_handle
        if handle is not None:
            cycle.timeout_handle = None
            handle.cancel()
        hook = self.state.on_request_end
        if hook is not None:
            status = cycle.status or (_CLIENT_GONE if self.flow.lost else _INTERNAL_ERROR)
            try:
                hook(
                    cycle.environ,
                    status,
                    cycle.headers,
                    cycle.bytes_sent,
                    time.perf_counter() - cycle.started,
                )
            except Exception:
                self.log.exception("on_request_end hook failed")
        self._cycle_done(cycle)

    async def _run_async(self: HttpProtocol, cycle: RequestCycle) -> None:  # type: ignore[misc]
        environ = cycle.environ
        environ[ASYNC_KEY] = True
        environ[POOL_KEY] = self.state.pool
        timeout = self.config.request_timeout
        websocket: WebSocket | None = environ.get(WEBSOCKET_KEY)
        if websocket is not None:
            # The application must accept or refuse a handshake promptly (websockets' and
            # uvicorn's open_timeout): a socket half-open for ever holds a connection slot.
            opening = self.config.websocket.open_timeout
            timeout = opening if timeout is None else min(timeout, opening)
        if timeout is not None:
            cycle.arm_timeout(timeout)
        body: Any = None
        try:
            body = await self.app(environ, cycle.start_response)
            if websocket is not None and cycle.status_code == 101:
                await self._run_websocket(cycle, websocket)
            else:
                await self._send_body(cycle, body, None)
        finally:
            if body is not None:
                await self._close_body(cycle, body, None)

    async def _run_websocket(self: HttpProtocol, cycle: RequestCycle, websocket: WebSocket) -> None:  # type: ignore[misc]
        # The connection now belongs to the socket: HTTP timers stop, reads go to it, and the
        # request stays open (the body is closed, ending the request, once the socket is gone).
        self._cancel_timers()
        cycle.keep_alive = False
        cycle.headers_sent = True
        early = bytes(self._after_upgrade or b"")
        self._after_upgrade = None
        self.parser = _SPENT_PARSER
        # The environ has them: the raw head fields (a dozen bytes pairs, about 1 KB) need not
        # live as long as the socket.  HTTP requests reset them at the next message's start.
        self._headers = []
        self._url = []
        self.websocket = websocket
        websocket.start(cycle.headers, early)
        cycle.finished = True
        await websocket.wait_closed()

    async def _run_sync(self: HttpProtocol, cycle: RequestCycle) -> None:  # type: ignore[misc]
        pool = self._pool()
        lease = pool.lease()
        body: Any = None
        try:
            future = lease.submit(self.app, cycle.environ, cycle.start_response)
            try:
                body = await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                # The call goes on in its thread; close what it returns there (PEP 3333).
                future.add_done_callback(_close_abandoned)
                raise
            await self._send_body(cycle, body, lease)
        finally:
            if body is not None:
                await self._close_body(cycle, body, lease, release=True)
            else:
                lease.release()

    def _pool(self: HttpProtocol) -> ThreadPool:  # type: ignore[misc]
        pool = self.state.pool
        if pool is None:
            raise RuntimeError("ServerState.pool is required to run sync code")
        return pool

    async def _off_loop(  # type: ignore[misc]
        self: HttpProtocol, lease: Lease | None, fn: Callable[..., Any], *args: Any
    ) -> Any:
        if lease is not None:
            return await lease.run(fn, *args)
        return await asyncio.wrap_future(self._pool().run(fn, *args))


def _close_abandoned(future: Any) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    close = getattr(future.result(), "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            logging.getLogger("async_handler.protocol").exception(
                "Error closing an abandoned response body"
            )
