"""The server: :class:`ServerState` shared by a worker's connections (shutdown, abort, waiting for
them to end), and :func:`serve`, which runs the protocol stand-alone (``runserver``, tests)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl as _ssl
import sys
from collections.abc import Callable
from typing import IO, Any

from ..threads import ThreadPool
from .config import Logger, OnRequestEnd, OnRequestStart, ServerConfig
from .connection import HttpProtocol
from .fields import DateHeader, TrustedPeers


class ServerState:
    """State shared by every connection of one server (one gunicorn worker).

    All methods run on the event loop.  ``connections`` holds the live :class:`HttpProtocol`
    instances; ``requests`` the request tasks still running (one may outlive its connection:
    a request whose client left is cancelled, and its clean-up, a WebSocket view's end
    included, still runs); ``total_requests`` counts requests handed to the application.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        pool: ThreadPool | None = None,
        log: Logger | None = None,
        on_request_start: OnRequestStart | None = None,
        on_request_end: OnRequestEnd | None = None,
        errors: IO[str] | None = None,
    ) -> None:
        self.config = config if config is not None else ServerConfig()
        self.pool = pool
        self.log: Logger = log if log is not None else logging.getLogger("async_handler.protocol")
        self.on_request_start = on_request_start
        self.on_request_end = on_request_end
        #: ``wsgi.errors`` for every request.
        self.errors: IO[str] = errors if errors is not None else sys.stderr
        self.connections: set[HttpProtocol] = set()
        self.requests: set[asyncio.Task[None]] = set()
        self.total_requests = 0
        self.shutting_down = False
        #: The close code a graceful shutdown sends on open WebSockets.
        self.websocket_code = 1012
        self.trusted = TrustedPeers(self.config.forwarded_allow_ips)
        self.date = DateHeader()
        software = self.config.server_header
        if software is None:
            software = self.config.server_software
        #: The ``Server`` value ("" for none), and its field line as written in heads.
        self.server_name = software
        self.server_header = b"Server: " + software.encode("latin-1") + b"\r\n" if software else b""
        self._waiters: list[asyncio.Future[None]] = []

    def shutdown(self, websocket_code: int = 1012) -> None:
        """Graceful shutdown: no new requests; idle connections close now, busy ones after
        their request in flight (answered with ``Connection: close``); WebSockets are closed
        with ``websocket_code``: 1012 (Service Restart) by default, 1001 (Going Away) for a
        server that is not coming back (RFC 6455 section 7.4.1, IANA registry)."""
        self.shutting_down = True
        self.websocket_code = websocket_code
        for conn in list(self.connections):
            conn.shutdown()

    def abort(self) -> None:
        """Quick shutdown: drop every connection now (requests in flight are cancelled)."""
        self.shutting_down = True
        for conn in list(self.connections):
            conn.abort()

    @property
    def busy(self) -> bool:
        """Whether a connection is live or a request still running."""
        return bool(self.connections or self.requests)

    async def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until no connection is left and no request runs (a graceful stop must not cut
        the clean-up of a request whose connection is already gone); ``False`` if ``timeout``
        expired first."""
        return await self._wait(lambda: not self.busy, timeout)

    async def wait_below(self, limit: int, timeout: float | None = None) -> bool:
        """Wait until fewer than ``limit`` connections are live; ``False`` on timeout."""
        return await self._wait(lambda: len(self.connections) < limit, timeout)

    async def _wait(self, done: Callable[[], bool], timeout: float | None) -> bool:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not done():
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                if deadline is None:
                    await waiter
                else:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        return False
                    await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return False
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return True

    def _add(self, conn: HttpProtocol) -> None:
        self.connections.add(conn)

    def _add_request(self, task: asyncio.Task[None]) -> None:
        # Tracked until done, not until its own last line: a task cancelled before it ever
        # ran never reaches its finally.
        self.requests.add(task)
        task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self.requests.discard(task)
        if not self.requests and not self.connections:
            self._wake()

    def _remove(self, conn: HttpProtocol) -> None:
        self.connections.discard(conn)
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class Server:
    """A running :func:`serve` server.

    ``close()`` stops listening and starts a graceful shutdown; ``await wait_closed()`` returns
    when every connection is gone.  Also an async context manager (closes on exit).
    """

    def __init__(
        self,
        server: asyncio.AbstractServer,
        state: ServerState,
        owned_pool: ThreadPool | None,
    ) -> None:
        self._server = server
        self.state = state
        self._owned_pool = owned_pool

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (``sockets[0].getsockname()`` gives the bound port)."""
        return tuple(getattr(self._server, "sockets", ()) or ())

    def close(self, websocket_code: int = 1012) -> None:
        """Stop accepting; finish requests in flight, close idle connections now, and open
        WebSockets with ``websocket_code`` (see :meth:`ServerState.shutdown`)."""
        self._server.close()
        self.state.shutdown(websocket_code)

    def abort(self) -> None:
        """Stop accepting and drop every connection now."""
        self._server.close()
        self.state.abort()

    async def wait_closed(self, timeout: float | None = None) -> None:
        """Wait for every connection to end; after ``timeout`` seconds, abort the rest.

        Shuts down the thread pool if :func:`serve` created it.
        """
        if not await self.state.wait_closed(timeout):
            self.state.abort()
            await self.state.wait_closed(5.0)
        await self._server.wait_closed()
        if self._owned_pool is not None:
            self._owned_pool.shutdown()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


async def serve(
    app: Callable[..., Any],
    *,
    host: str | None = None,
    port: int | None = None,
    sock: socket.socket | None = None,
    config: ServerConfig | None = None,
    pool: ThreadPool | None = None,
    ssl: _ssl.SSLContext | None = None,
    log: Logger | None = None,
) -> Server:
    """Serve the WSGI application ``app`` on the running loop; return a :class:`Server`.

    Listen on ``sock`` (an already bound socket) or on ``host``/``port`` (``port=0`` picks a free
    one).  ``config`` defaults to :class:`ServerConfig` ``()``; ``pool`` is the thread pool for
    sync code (one of ``min(32, cpus + 4)`` threads is created, and shut down by
    :meth:`Server.wait_closed`, when omitted); ``ssl`` enables TLS; ``log`` receives the
    protocol's messages (a ``logging.Logger``-like object).  The server is accepting when this
    returns.  Stable API: ``manage.py runserver`` and the tests are built on it.
    """
    if sock is not None and (host is not None or port is not None):
        raise ValueError("serve(): pass either sock or host/port, not both")
    config = config if config is not None else ServerConfig()
    owned = None
    if pool is None:
        owned = pool = ThreadPool(min(32, (os.cpu_count() or 1) + 4))
    state = ServerState(config, pool=pool, log=log)
    loop = asyncio.get_running_loop()

    def factory() -> HttpProtocol:
        return HttpProtocol(app, state)

    if sock is not None:
        server = await loop.create_server(factory, sock=sock, ssl=ssl)
    else:
        server = await loop.create_server(factory, host=host, port=port or 0, ssl=ssl)
    return Server(server, state, owned)
