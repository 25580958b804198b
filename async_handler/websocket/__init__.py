"""WebSocket endpoints as ordinary Django views, routed by the URLconf.

Layer: Django glue.  The handshake is an ordinary request: it passes through all of
``settings.MIDDLEWARE`` (sessions, authentication, ``ALLOWED_HOSTS``, your own middleware), so
``request.user`` and friends work as for HTTP.  The view refuses it with any HTTP response, or
accepts it; the 101 then travels back out through the middleware, whose headers (``Set-Cookie``)
go with it, and the socket lives on the server's loop, holding no thread.  The server side is
the contract's :class:`~async_handler.contract.WebSocketSession` (our worker's is
:class:`async_handler.http.websocket.WebSocket`); :mod:`.groups` carries broadcasts.

::

    @websocket(subprotocols=["chat.v1"])
    async def chat(request, ws, room):
        await ws.accept()
        async with ws.join(f"chat.{room}"):
            async for message in ws:
                await broadcast(f"chat.{room}", message)
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, overload
from urllib.parse import urlsplit

from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.core import signals
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, HttpResponseBase, HttpResponseForbidden
from django.utils.http import is_same_domain

from .._hop import request_executor, route_to, run_sync
from ..contract import ASYNC_KEY, WEBSOCKET_KEY, WebSocketDisconnect, WebSocketSession
from .groups import broadcast, broadcast_sync, membership

__all__ = [
    "WebSocket",
    "WebSocketDisconnect",
    "broadcast",
    "broadcast_sync",
    "websocket",
]

logger = logging.getLogger("async_handler.websocket")
request_logger = logging.getLogger("django.request")

#: Broadcast messages waiting to be written to one socket; a socket further behind than this
#: is closed with 1013 (Try Again Later) rather than skipped or buffered without bound.
#: ``settings.ASYNC_HANDLER_WS_OUTBOX_SIZE`` overrides it.
OUTBOX_SIZE = 256

#: After a clean close, how long the view may run on before it is cancelled: time to leave its
#: ``async for`` loop and clean up (websockets' and uvicorn's close timeout).
#: ``settings.ASYNC_HANDLER_WS_FINISH_GRACE`` overrides it.
FINISH_GRACE = 10.0

_View = TypeVar("_View", bound=Callable[..., Awaitable[Any]])

_NOT_UPGRADED = (
    "A WebSocket handshake needs a server that can upgrade the connection: run gunicorn with "
    "-k async_handler.worker.AsyncioWorker, or manage.py runserver with 'async_handler' in "
    "INSTALLED_APPS.\n"
)
_NOT_A_HANDSHAKE = "This URL is a WebSocket endpoint: connect with a WebSocket client.\n"


def _outbox_size() -> int:
    size = getattr(settings, "ASYNC_HANDLER_WS_OUTBOX_SIZE", OUTBOX_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ImproperlyConfigured(
            f"settings.ASYNC_HANDLER_WS_OUTBOX_SIZE must be an integer >= 1, got {size!r}"
        )
    return size


def _finish_grace() -> float:
    grace = getattr(settings, "ASYNC_HANDLER_WS_FINISH_GRACE", FINISH_GRACE)
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace < 3600:
        raise ImproperlyConfigured(
            f"settings.ASYNC_HANDLER_WS_FINISH_GRACE must be a number of seconds in [0, 3600), "
            f"got {grace!r}"
        )
    return float(grace)


class WebSocket:
    """The view's side of one WebSocket (the second argument of a ``@websocket`` view).

    Before :meth:`accept` the view may still refuse the handshake by returning an HTTP
    response.  Iterating it yields each message (``str`` for text, ``bytes`` for binary) until
    the socket closes.
    """

    def __init__(
        self, request: HttpRequest, session: WebSocketSession, subprotocols: Sequence[str]
    ) -> None:
        self.request = request
        self._session = session
        self._supported = tuple(subprotocols)
        #: The subprotocol chosen by :meth:`accept`, or ``None``.
        self.subprotocol: str | None = None
        self._accepted: asyncio.Future[HttpResponse] = asyncio.get_running_loop().create_future()
        self._view_task: asyncio.Task[Any] | None = None
        # Created by the first broadcast: an empty deque takes 760 bytes per socket.
        self._outbox: deque[str | bytes] | None = None
        self._outbox_size = _outbox_size()
        self._finish_grace = _finish_grace()
        self._overflowed = False
        self._sender: asyncio.Task[None] | None = None
        # The request's thread lease: the socket's sync code runs there once the handshake's
        # middleware has let go of its thread (see accept()).
        self._executor = request_executor()
        self._route: route_to | None = None

    @property
    def close_code(self) -> int | None:
        """The close code once the socket is closed (``1006``: the connection was lost)."""
        return self._session.close_code

    async def accept(
        self,
        subprotocol: str | None = None,
        headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
    ) -> None:
        """Accept the handshake: the 101 leaves through the middleware, with ``headers``.

        ``subprotocol`` must be one the client offered; by default the first offered one that
        ``@websocket(subprotocols=...)`` supports is chosen, or none.  Returns once the 101 is
        sent; :class:`WebSocketDisconnect` if a middleware answered otherwise or the client left.
        """
        if self._accepted.done():
            raise RuntimeError("WebSocket.accept() was already called")
        offered = self._session.subprotocols
        if subprotocol is not None:
            if subprotocol not in offered:
                raise ValueError(
                    f"Subprotocol {subprotocol!r} was not offered by the client "
                    f"(offered: {', '.join(offered) or 'none'})"
                )
        else:
            subprotocol = next((p for p in offered if p in self._supported), None)
        self.subprotocol = subprotocol
        response = HttpResponse(status=101)
        for name, value in headers.items() if isinstance(headers, Mapping) else headers or ():
            response[name] = value
        if subprotocol is not None:
            response["Sec-WebSocket-Protocol"] = subprotocol
        # The handler awaits this when the server closes the request: the socket is over.
        response._async_handler_finish = self._finish  # type: ignore[attr-defined]
        self._accepted.set_result(response)
        await self._session.opened()
        if self._executor is not None and self._route is None:
            # Until now a sync-only middleware's async_to_sync ran this view's sync calls on
            # its blocked thread; that thread is free again, and the routing of the request
            # ends with the handler's part: from here this task routes to the lease itself.
            self._route = route_to(self._executor)
            self._route.__enter__()

    async def receive(self) -> str | bytes:
        """The next message; :class:`WebSocketDisconnect` with the close code once closed."""
        return await self._session.receive()

    async def send(self, data: str | bytes) -> None:
        """Send a message: ``str`` as a text frame, ``bytes`` as a binary frame."""
        await self._session.send(data)

    async def receive_json(self) -> Any:
        """The next message, decoded as JSON."""
        return json.loads(await self._session.receive())

    async def send_json(self, data: Any) -> None:
        """Send ``data`` encoded as JSON, in a text frame."""
        await self._session.send(json.dumps(data))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the socket and wait for the closing handshake (bounded by the server)."""
        await self._session.close(code, reason)

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[str | bytes]:
        while True:
            try:
                message = await self._session.receive()
            except WebSocketDisconnect:
                return
            yield message

    def join(self, group: str) -> Any:
        """``async with ws.join(group):`` this socket receives what is broadcast to ``group``,
        until the block exits (normally, by an error or by cancellation)."""
        return membership(group, self)

    # -- groups.Member

    def deliver(self, message: str | bytes) -> None:
        """Queue a broadcast for this socket (called by :mod:`.groups` on the loop); once the
        socket has overflowed nothing more is queued: it is closing with 1013."""
        if self._overflowed:
            return
        outbox = self._outbox
        if outbox is None:
            outbox = self._outbox = deque()
        elif len(outbox) >= self._outbox_size:
            self.overflow()
            return
        outbox.append(message)
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_outbox())

    def overflow(self) -> None:
        """This socket cannot keep up with its groups: close it with 1013, never skip.
        Idempotent: one close and one log line per socket."""
        if self._overflowed or self._session.close_code is not None:
            return
        # Without the flag every further outbox-full of messages queued while the close frame
        # waits behind the stalled data would log and close again.
        self._overflowed = True
        logger.warning(
            "Closing WebSocket %s with 1013: more than %d broadcast messages behind",
            self.request.path,
            self._outbox_size,
        )
        if self._outbox is not None:
            self._outbox.clear()
        asyncio.get_running_loop().create_task(self._close_quietly(1013, "too slow"))

    async def _send_outbox(self) -> None:
        outbox = self._outbox
        assert outbox is not None  # deliver() made it before starting this task
        try:
            while outbox:
                await self._session.send(outbox.popleft())
        except WebSocketDisconnect:
            outbox.clear()
        finally:
            self._sender = None

    async def _close_quietly(self, code: int, reason: str) -> None:
        try:
            await self._session.close(code, reason)
        except WebSocketDisconnect:
            pass

    # -- running the view

    async def _run(self, view: Callable[..., Awaitable[Any]], args: Any, kwargs: Any) -> Any:
        task = self._view_task = asyncio.ensure_future(self._main(view, args, kwargs))
        try:
            await asyncio.wait({task, self._accepted}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # The handshake was abandoned (client gone, open timeout): so is the view.
            task.cancel()
            raise
        if self._accepted.done():
            return self._accepted.result()
        return task.result()  # refused with a response, or an error for Django's 500 path

    async def _main(self, view: Callable[..., Awaitable[Any]], args: Any, kwargs: Any) -> Any:
        try:
            return await self._run_view(view, args, kwargs)
        finally:
            if self._route is not None:
                self._route.__exit__(None, None, None)

    async def _run_view(self, view: Callable[..., Awaitable[Any]], args: Any, kwargs: Any) -> Any:
        try:
            result = await view(self.request, self, *args, **kwargs)
        except WebSocketDisconnect:
            return None
        except Exception as exc:
            if not self._accepted.done():
                raise
            # After the 101 there is no response to turn it into: log it as Django logs a
            # 500 and close with 1011 (RFC 6455 section 7.4.1, internal error).
            request_logger.error(
                "Internal Server Error: %s",
                self.request.path,
                exc_info=exc,
                extra={"status_code": 500, "request": self.request},
            )
            # A sync send on the request's thread, as Django's response_for_exception makes
            # it: receivers (Django's test client, Sentry) read the error from sys.exc_info(),
            # which asend() hides from sync receivers (they run in a task of their own).
            await run_sync(
                functools.partial(
                    signals.got_request_exception.send, sender=None, request=self.request
                )
            )
            await self._close_quietly(1011, "internal error")
            return None
        if not self._accepted.done():
            if isinstance(result, HttpResponseBase):
                return result
            raise ValueError(
                f"The WebSocket view {getattr(view, '__qualname__', view)!r} returned "
                f"{result!r} without accepting the handshake: call ws.accept(), or return an "
                "HttpResponse to refuse it."
            )
        await self._close_quietly(1000, "")
        return None

    async def _finish(self) -> None:
        """The socket is over (the server closes the request): end the view and its sender.

        A view whose client vanished is cancelled at once; after a clean close it gets
        :data:`FINISH_GRACE` seconds (``settings.ASYNC_HANDLER_WS_FINISH_GRACE``) to return by
        itself first.  Cancelled while waiting (the worker's shutdown ran out of time), it
        still cancels the view and waits for it before the cancellation goes on, so the view's
        own clean-up runs before the request ends.
        """
        tasks = [t for t in (self._view_task, self._sender) if t is not None and not t.done()]
        if not tasks:
            return
        try:
            if self._session.close_code != 1006:
                await asyncio.wait(tasks, timeout=self._finish_grace)
        finally:
            # Also when the request itself is cancelled during the grace: the view must not
            # outlive it.
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)


def _origin_allowed(request: HttpRequest, allowed: Sequence[str] | None) -> bool:
    """Whether the handshake's ``Origin`` may open a socket, by ``CsrfViewMiddleware``'s rules
    for unsafe methods (the handshake is a GET, which CSRF protection never checks).

    No ``Origin``: not a browser (every browser sends it on a WebSocket, RFC 6455 section 4.1),
    so no cross-site request to forge.  The same origin is always allowed; then
    ``allowed_origins`` if the view gives it, else ``CSRF_TRUSTED_ORIGINS`` (exact, or
    ``scheme://*.domain`` for subdomains; ``"*"`` in ``allowed_origins`` allows any).
    """
    origin = request.META.get("HTTP_ORIGIN")
    if origin is None:
        return True
    if origin == f"{request.scheme}://{request.get_host()}":
        return True
    trusted = settings.CSRF_TRUSTED_ORIGINS if allowed is None else allowed
    if origin in trusted or "*" in trusted:
        return True
    try:
        parsed = urlsplit(origin)
        netloc = parsed.netloc
    except ValueError:
        return False
    for pattern in trusted:
        if "*" in pattern:
            wanted = urlsplit(pattern)
            if wanted.scheme == parsed.scheme and is_same_domain(netloc, wanted.netloc[1:]):
                return True
    return False


def _is_handshake(request: HttpRequest) -> bool:
    return "websocket" in request.META.get("HTTP_UPGRADE", "").lower()


@overload
def websocket(view: _View, /) -> _View: ...
@overload
def websocket(
    *, subprotocols: Sequence[str] = (), allowed_origins: Sequence[str] | None = None
) -> Callable[[_View], _View]: ...


def websocket(
    view: _View | None = None,
    /,
    *,
    subprotocols: Sequence[str] = (),
    allowed_origins: Sequence[str] | None = None,
) -> Any:
    """Make ``async def view(request, ws, *args, **kwargs)`` a WebSocket endpoint.

    The wrapped view is an ordinary ``async def`` view for the URLconf.  A request that is not a
    WebSocket handshake gets 426 Upgrade Required; so does a handshake under a server that
    cannot upgrade (a plain WSGI server), with a message saying which can.  A handshake from a
    cross-site ``Origin`` (see ``allowed_origins``) gets 403 before the view runs.
    """

    def decorate(view: _View) -> _View:
        if not iscoroutinefunction(view):
            raise TypeError(f"@websocket needs an async def view, got {view!r}")

        @functools.wraps(view)
        async def endpoint(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            session: WebSocketSession | None = request.META.get(WEBSOCKET_KEY)
            if session is None:
                text = _NOT_UPGRADED if _is_handshake(request) else _NOT_A_HANDSHAKE
                response = HttpResponse(text, status=426, content_type="text/plain")
                if request.META.get(ASYNC_KEY):
                    # RFC 9110 section 15.5.22: a 426 names the protocol in Upgrade.  Only on
                    # a contract server: PEP 3333 forbids hop-by-hop fields to applications,
                    # and wsgiref (Django's runserver --wsgi) fails the response over it.
                    response["Upgrade"] = "websocket"
                return response
            if not _origin_allowed(request, allowed_origins):
                logger.warning(
                    "Refused a WebSocket handshake to %s from Origin %s",
                    request.path,
                    request.META.get("HTTP_ORIGIN"),
                )
                return HttpResponseForbidden(
                    "WebSocket handshake from an origin this site does not trust.\n",
                    content_type="text/plain",
                )
            ws = WebSocket(request, session, subprotocols)
            result: HttpResponseBase = await ws._run(view, args, kwargs)
            return result

        endpoint.async_handler_websocket = True  # type: ignore[attr-defined]
        return endpoint  # type: ignore[return-value]

    if view is not None:
        return decorate(view)
    return decorate
