"""The server contract between a loop-owning WSGI server and an async-aware application.

It extends PEP 3333 with two environ keys; any server may implement it, and any application may
honour it.  This module is stdlib-only so that both sides can import it.

An application declares that it honours the contract with a true class attribute named
:data:`AWAITABLE_ATTR`.  A server that runs an asyncio event loop calls such an application *on
its loop* with ``environ[ASYNC_KEY] = True``; it calls every other application (and any WSGI
middleware wrapping ours, which does not carry the attribute) in a worker thread, without the
key, as a plain PEP 3333 application.  With the key set, ``application(environ,
start_response)`` returns an *awaitable* instead of an iterable.  The server awaits it on its
loop, in the task that serves the request, and:

* ``start_response`` has been called by the time the awaitable completes (exactly as PEP 3333
  requires before the first body chunk);
* the awaitable's result is the response body: a sync iterable of ``bytes`` (the server reads
  any iterable that is not a ``list`` or ``tuple`` off the loop, since it may block) or an async
  iterable of ``bytes`` (iterated on the loop);
* a result that is an instance of the server's ``wsgi.file_wrapper`` may be sent with
  ``sendfile``;
* when the body is finished, or the request is abandoned, the server awaits ``result.aclose()``
  if the result has it, and otherwise calls ``result.close()`` off the loop, as PEP 3333 asks;
* if the client goes away or a server timeout expires while the awaitable is pending, the server
  cancels its task; the application sees :class:`asyncio.CancelledError` and cleans up itself.

The server may also pass its thread pool as ``environ[POOL_KEY]`` (an
:class:`async_handler.threads.ThreadPool`) so that the application runs its sync code on the
same long-lived threads instead of a pool of its own.

An application that does not see ``ASYNC_KEY`` must behave as an ordinary WSGI application.

Boot warnings.  An application may have a method named :data:`BOOT_WARNINGS_ATTR`: a server calls
it once per process after loading the application (and after exporting what it knows of its
deployment, such as ``ASYNC_HANDLER_WORKERS``), and logs each string it returns as a warning in
its own log: problems of the deployment that the application can see but only the server's log
reaches the operator with.

WebSockets (RFC 6455).  On a valid WebSocket handshake a server that can upgrade the connection
sets ``environ[WEBSOCKET_KEY]`` to a :class:`WebSocketSession` (a malformed handshake is refused
by the server and never reaches the application).  The application then either:

* *accepts*: calls ``start_response("101 Switching Protocols", headers)`` and returns an empty
  body.  The server adds the handshake's own fields (``Upgrade``, ``Connection``,
  ``Sec-WebSocket-Accept``, ``Sec-WebSocket-Extensions``) to ``headers`` (``Content-Type`` and
  ``Content-Length`` are dropped: a 101 has no body), sends it, and the session opens; or
* *answers in HTTP*: any other status is sent as an ordinary response, and the connection
  closes after it.

After a 101 the server keeps the request open until the session is over (both close frames
exchanged, or the connection lost), and only then closes the body (``aclose()``) as above: that
is where the application stops using the session, and where PEP 3333's end of the request is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = [
    "ASYNC_KEY",
    "AWAITABLE_ATTR",
    "BOOT_WARNINGS_ATTR",
    "POOL_KEY",
    "WEBSOCKET_KEY",
    "WebSocketDisconnect",
    "WebSocketSession",
]

#: Set to ``True`` by a server that awaits the application's result on its event loop.
ASYNC_KEY = "async_handler.async"

#: The server's :class:`~async_handler.threads.ThreadPool`, for the application's sync code.
POOL_KEY = "async_handler.thread_pool"

#: Name of the class attribute (``True``) by which an application declares it honours the contract.
AWAITABLE_ATTR = "async_handler_awaitable"

#: Name of the optional application method returning warnings for the server's boot log.
BOOT_WARNINGS_ATTR = "async_handler_boot_warnings"

#: Set by a server on a valid WebSocket handshake it can upgrade: a :class:`WebSocketSession`.
WEBSOCKET_KEY = "async_handler.websocket"


class WebSocketDisconnect(Exception):
    """The WebSocket is closed: by the peer, by the application, by the server, or lost.

    ``code`` is the close code received (RFC 6455 section 7.1.5), ``1005`` when the close frame
    carried none, ``1006`` when the connection ended without a closing handshake.
    """

    def __init__(self, code: int = 1000, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"WebSocket closed with code {self.code}" + (
            f": {self.reason}" if self.reason else ""
        )


class WebSocketSession(Protocol):
    """A server's side of one WebSocket, for the application (see the module docstring).

    Every method must be called on the server's loop.  Messages are ``str`` (text frames) or
    ``bytes`` (binary frames), whole, whatever their fragmentation on the wire.
    """

    #: The subprotocols the client offered (``Sec-WebSocket-Protocol``), in its order.
    subprotocols: Sequence[str]

    @property
    def close_code(self) -> int | None:
        """The close code once the session is closed (``1006``: lost), else ``None``."""
        ...

    async def opened(self) -> None:
        """Return once the 101 is sent; raise :class:`WebSocketDisconnect` (``1006``) if the
        handshake was answered otherwise or the connection went away first."""
        ...

    async def receive(self) -> str | bytes:
        """The next message; :class:`WebSocketDisconnect` once the session is closed."""
        ...

    async def send(self, data: str | bytes) -> None:
        """Send one message, waiting while the peer reads slower than we write;
        :class:`WebSocketDisconnect` if the session is closed."""
        ...

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (if not started) and return once it is over, or the
        server's close timeout has passed and the connection is dropped."""
        ...
