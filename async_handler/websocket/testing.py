"""Test WebSocket views in process, through the real application and middleware chain.

:class:`WebSocketClient` plays both the browser and our server for one socket.  It calls the
project's :class:`~async_handler.AsyncDjangoApplication` as the worker does (the coroutine
``__call__``, a WSGI environ carrying the handshake, :data:`~async_handler.contract.ASYNC_KEY`),
with an in-memory :class:`~async_handler.contract.WebSocketSession` where the server would put
its socket; a 101 opens the session, any other answer is a :class:`HandshakeRejected`.  So the
handshake passes ``settings.MIDDLEWARE`` (sessions, authentication, CSRF's origin rules, your
own), and a Django test client's cookies, ``force_login()`` included, go with it::

    async def test_chat(client):            # django.test.Client (pytest-django's ``client``)
        await sync_to_async(client.force_login)(user)
        async with WebSocketClient("/ws/chat/lobby/", client=client) as ws:
            await ws.send("hi")
            assert await ws.receive() == "hi"

What it does not do: frames, masking and permessage-deflate (the ``websockets`` library's part
in the server, tested there), ping timeouts, the server's size limits and back-pressure.
The API follows Channels' ``WebsocketCommunicator``; messages are ``str`` (text) or ``bytes``
(binary); a close from the application raises the contract's
:class:`~async_handler.contract.WebSocketDisconnect`, as it does in the view.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.cookies import SimpleCookie
from types import TracebackType
from typing import Any, Literal

from django.conf import settings
from django.core import signals
from websockets.utils import accept_key

from ..contract import WEBSOCKET_KEY, WebSocketDisconnect
from ..http.websocket import _SERVER_FIELDS
from ._handshake import (
    SAME_ORIGIN,
    HandshakeRejected,
    HandshakeResponse,
    _Origin,
    handshake_environ,
)
from ._memory import MemorySession, check_close, message

__all__ = ["SAME_ORIGIN", "HandshakeRejected", "HandshakeResponse", "WebSocketClient"]


# One application per MIDDLEWARE setting: building the chain costs, and its thread pool lives
# as long as the process (as under the worker); override_settings(MIDDLEWARE=...) gets its own.
_applications: dict[tuple[str, ...], Any] = {}


def _application() -> Any:
    from ..handler import AsyncDjangoApplication

    key = tuple(settings.MIDDLEWARE)
    app = _applications.get(key)
    if app is None:
        app = _applications[key] = AsyncDjangoApplication()
    return app


class WebSocketClient:
    """One WebSocket to ``path`` (with its query string) on this project, in process.

    ``client``: a ``django.test.Client`` or ``AsyncClient`` whose cookies (its login, after
    ``force_login``) and default headers the handshake carries; the handshake's ``Set-Cookie``
    goes back into its cookies, as for any response it receives.  ``headers`` adds request
    headers; ``subprotocols`` are offered in order; ``origin`` is sent as ``Origin`` (the site's
    own by default, ``None`` for none, as a non-browser client); ``secure`` makes it ``wss``.
    ``application`` defaults to an ``AsyncDjangoApplication`` for the current settings.

    With ``raise_request_exception`` (the default, as for Django's test client) an exception in
    the view is raised in the test: by :meth:`connect` if the view had not accepted (instead of
    the 500), else by the call that meets the close (1011).  Otherwise those are the 500's
    :class:`HandshakeRejected` and a ``WebSocketDisconnect`` with code 1011.

    ``async with`` connects and, on exit, closes with 1000 if still open and waits for the
    request to end, so that no task of the socket outlives the block.

    The view's sync code (sessions, ``auser()``, ORM calls) runs on the application's threads,
    with database connections of their own, as under the worker: what the test writes must be
    committed to be seen there (``TransactionTestCase``, or pytest-django's
    ``django_db(transaction=True)``), as with Channels' communicator.
    """

    def __init__(
        self,
        path: str,
        *,
        client: Any = None,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        subprotocols: Sequence[str] = (),
        origin: str | Literal[_Origin.SAME] | None = SAME_ORIGIN,
        secure: bool = False,
        application: Any = None,
        raise_request_exception: bool = True,
    ) -> None:
        self.path = path
        self._client = client
        self._headers = list(headers.items() if isinstance(headers, Mapping) else headers or ())
        self._offered = tuple(subprotocols)
        self._origin = origin
        self._secure = secure
        self._application = application
        self.raise_request_exception = raise_request_exception
        #: The 101 (status, headers: middleware's ``Set-Cookie``...), once connected.
        self.response: HandshakeResponse | None = None
        #: The subprotocol the view accepted with, or ``None``.
        self.subprotocol: str | None = None
        self._session: MemorySession | None = None
        self._runner: asyncio.Task[None] | None = None
        self._handshake: asyncio.Future[HandshakeResponse] | None = None
        self._status = ""
        self._response_headers: list[tuple[str, str]] = []
        self._inbox: deque[str | bytes] = deque()
        self._close_received: tuple[int, str] | None = None
        self._close_sent: tuple[int, str] | None = None
        self._dropped = False
        self._activity = asyncio.Event()
        self._error: BaseException | None = None
        self._uid = f"async_handler.websocket.testing-{id(self)}"

    @property
    def close_code(self) -> int | None:
        """The code of the application's close frame (its echo of ours if we closed first),
        ``1006`` after :meth:`drop`, ``None`` while open."""
        if self._close_received is not None:
            return self._close_received[0]
        return 1006 if self._dropped else None

    @property
    def close_reason(self) -> str | None:
        """The reason of the application's close frame, if one came."""
        return self._close_received[1] if self._close_received is not None else None

    # -- opening

    async def connect(self, timeout: float = 5.0) -> HandshakeResponse:
        """Send the handshake; return the 101 once the view accepted.

        Raises :class:`HandshakeRejected` with the HTTP answer if it was refused (a view's
        response, a middleware's, the 403 for a cross-site ``Origin``), the view's exception
        (see ``raise_request_exception``), or ``TimeoutError`` if there was no answer within
        ``timeout`` seconds (the handshake is then abandoned, as the server's open timeout does).
        """
        if self._runner is not None:
            raise RuntimeError("WebSocketClient.connect() was already called")
        loop = asyncio.get_running_loop()
        self._session = MemorySession(self, self._offered)
        self._handshake = loop.create_future()
        environ = self._environ()
        signals.got_request_exception.connect(self._store_exception, dispatch_uid=self._uid)
        self._runner = loop.create_task(self._serve(environ), name=f"WebSocketClient {self.path}")
        self._runner.add_done_callback(self._runner_done)
        waiting: set[asyncio.Future[Any]] = {self._handshake, self._runner}
        try:
            await asyncio.wait(
                waiting,
                timeout=timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        except asyncio.CancelledError:
            await self._cancel_runner()
            raise
        if not self._handshake.done():
            await self._cancel_runner()
            raise TimeoutError(f"no answer to the WebSocket handshake to {self.path} in {timeout}s")
        response = self._handshake.result()  # the driver's own failure, if any, raises here
        if response.status_code != 101:
            await self._stop_runner()
            self._raise_pending()
            raise HandshakeRejected(self.path, response)
        self.response = response
        self.subprotocol = response.get("Sec-WebSocket-Protocol")
        return response

    def _environ(self) -> dict[str, Any]:
        environ = handshake_environ(
            self.path,
            client=self._client,
            headers=self._headers,
            subprotocols=self._offered,
            origin=self._origin,
            secure=self._secure,
        )
        environ[WEBSOCKET_KEY] = self._session
        return environ

    def _start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None and self._status:
            raise exc_info[1].with_traceback(exc_info[2])  # PEP 3333: too late to change
        # Trimmed as a client reading them off the wire sees them (RFC 9110 section 5.5).
        self._status = status
        self._response_headers = [(name, value.strip(" \t")) for name, value in headers]
        return self._write_forbidden

    @staticmethod
    def _write_forbidden(data: bytes) -> None:
        raise RuntimeError("write() is not part of the async_handler server contract")

    async def _serve(self, environ: dict[str, Any]) -> None:
        # The worker's request task for this handshake (async_handler.http.dispatch): await the
        # application; a 101 opens the socket and the request lasts until it is closed; any
        # other answer is sent as HTTP and the connection ends.  The body is closed last.
        session, handshake = self._session, self._handshake
        assert session is not None and handshake is not None
        app = self._application or _application()
        body: Any = None
        try:
            body = await app(environ, self._start_response)
            code, _, reason = self._status.partition(" ")
            if int(code) == 101:
                key = environ["HTTP_SEC_WEBSOCKET_KEY"]
                headers = [
                    ("Upgrade", "websocket"),
                    ("Connection", "Upgrade"),
                    ("Sec-WebSocket-Accept", accept_key(key)),
                    *((k, v) for k, v in self._response_headers if k.lower() not in _SERVER_FIELDS),
                ]
                self._keep_cookies(headers)
                session.start()
                handshake.set_result(HandshakeResponse(101, reason, tuple(headers)))
                await session.wait_closed()
            else:
                content = await self._read(body)
                self._keep_cookies(self._response_headers)
                session.connection_lost()
                response = HandshakeResponse(
                    int(code), reason, tuple(self._response_headers), content
                )
                handshake.set_result(response)
        except BaseException as exc:
            session.connection_lost()
            if not handshake.done():
                if isinstance(exc, asyncio.CancelledError):
                    handshake.cancel()
                else:
                    handshake.set_exception(exc)
            raise
        finally:
            if body is not None:
                aclose = getattr(body, "aclose", None)
                if aclose is not None:
                    await aclose()
                else:
                    await asyncio.to_thread(body.close)

    @staticmethod
    async def _read(body: Any) -> bytes:
        if hasattr(body, "__aiter__"):
            return b"".join([chunk async for chunk in body])
        if isinstance(body, (list, tuple)):
            return b"".join(body)
        return await asyncio.to_thread(b"".join, body)

    def _keep_cookies(self, headers: Iterable[tuple[str, str]]) -> None:
        # As Django's test client does with every response: its cookies follow the server's.
        if self._client is None:
            return
        for name, value in headers:
            if name.lower() == "set-cookie":
                cookie: SimpleCookie = SimpleCookie()
                cookie.load(value)
                self._client.cookies.update(cookie)

    def _store_exception(self, sender: Any, request: Any = None, **kwargs: Any) -> None:
        # got_request_exception, as Django's test client listens to it: sys.exc_info() is the
        # view's exception (Django's 500 path, and WebSocket._run_view after the 101).
        if request is not None and request.META.get(WEBSOCKET_KEY) is self._session:
            error = sys.exc_info()[1]
            if error is not None and self._error is None:
                self._error = error

    def _raise_pending(self) -> None:
        error, self._error = self._error, None
        if error is not None and self.raise_request_exception:
            raise error

    def _runner_done(self, task: asyncio.Task[None]) -> None:
        signals.got_request_exception.disconnect(dispatch_uid=self._uid)
        self._activity.set()

    # -- the application's side of the session calls these

    def _deliver(self, message: str | bytes) -> None:
        self._inbox.append(message)
        self._activity.set()

    def _close_frame(self, code: int, reason: str) -> None:
        self._close_received = (code, reason)
        if self._close_sent is None:
            # A websockets client echoes the close frame as soon as it reads it.
            self._close_sent = (code, reason)
            assert self._session is not None
            self._session.close_frame(code, reason)
        self._activity.set()

    # -- talking

    def _connected(self) -> MemorySession:
        if self._session is None or self.response is None:
            raise RuntimeError("WebSocketClient is not connected: call connect() first")
        return self._session

    def _closed_error(self) -> WebSocketDisconnect:
        if self._close_received is not None:
            return WebSocketDisconnect(*self._close_received)
        if self._close_sent is not None:
            return WebSocketDisconnect(*self._close_sent)
        return WebSocketDisconnect(1006, "connection lost")

    async def send(self, data: str | bytes) -> None:
        """Send a message: ``str`` as a text frame, ``bytes`` as a binary frame.

        :class:`WebSocketDisconnect` once either side has closed (or after :meth:`drop`).
        """
        session = self._connected()
        if self._dropped or self._close_sent is not None or self._close_received is not None:
            raise self._closed_error()
        session.frame(message(data))
        # One turn of the loop, as a socket write would give: the view may run now.
        await asyncio.sleep(0)

    async def send_json(self, data: Any) -> None:
        """Send ``data`` encoded as JSON, in a text frame."""
        await self.send(json.dumps(data))

    async def receive(self, timeout: float = 2.0) -> str | bytes:
        """The application's next message: ``str`` (text) or ``bytes`` (binary).

        Messages sent before a close are received first; then the close raises
        :class:`WebSocketDisconnect` with its code and reason, or the view's exception that
        caused a 1011 (see ``raise_request_exception``).  ``TimeoutError`` after ``timeout``
        seconds without either; the socket stays open.
        """
        if not await self._wait_for_activity(timeout):
            raise TimeoutError(f"no message from {self.path} within {timeout}s")
        if self._inbox:
            return self._inbox.popleft()
        self._raise_runner_failure()
        self._raise_pending()
        raise self._closed_error()

    async def receive_json(self, timeout: float = 2.0) -> Any:
        """The next message, which must be a text frame, decoded as JSON."""
        message = await self.receive(timeout)
        if not isinstance(message, str):
            raise TypeError(f"expected a JSON text frame from {self.path}, got bytes {message!r}")
        return json.loads(message)

    async def receive_nothing(self, timeout: float = 0.1) -> bool:
        """Whether nothing (no message, no close) arrives within ``timeout`` seconds.

        Nothing is consumed: a message that did arrive is still there for :meth:`receive`.
        """
        return not await self._wait_for_activity(timeout)

    async def _wait_for_activity(self, timeout: float) -> bool:
        """Whether a message or the close is there within ``timeout`` seconds."""
        self._connected()
        try:
            async with asyncio.timeout(timeout):
                while not self._inbox and not self._over():
                    self._activity.clear()
                    await self._activity.wait()
        except TimeoutError:
            return False
        return True

    def _over(self) -> bool:
        runner = self._runner
        return (
            self._close_received is not None
            or self._dropped
            or (runner is not None and runner.done())
        )

    # -- ending

    async def close(self, code: int = 1000, reason: str = "", timeout: float = 2.0) -> None:
        """Close with ``code`` (unless closed already), then wait for the request to end.

        The view's ``receive()`` raises ``WebSocketDisconnect(code)`` and its ``async for``
        ends.  A view still running ``timeout`` seconds later is cancelled (the server gives it
        ``FINISH_GRACE`` seconds) and ``TimeoutError`` is raised.
        """
        session = self._connected()
        if self._close_sent is None and not self._dropped:
            check_close(code, reason)
            self._close_sent = (code, reason)
            session.close_frame(code, reason)
        await self._end(timeout)

    async def drop(self, timeout: float = 2.0) -> None:
        """Vanish without a closing handshake, as a client whose network went away: the view
        sees ``WebSocketDisconnect(1006)`` or, if it is not receiving, is cancelled at once."""
        session = self._connected()
        if not self._dropped and self._close_received is None:
            self._dropped = True
            session.connection_lost()
        await self._end(timeout)

    async def _end(self, timeout: float) -> None:
        runner = self._runner
        assert runner is not None
        if not runner.done():
            await asyncio.wait({runner}, timeout=timeout)
        if not runner.done():
            await self._cancel_runner()
            raise TimeoutError(
                f"the WebSocket view for {self.path} was still running {timeout}s after the "
                "socket closed, and was cancelled (the server cancels it after FINISH_GRACE)"
            )
        self._raise_runner_failure()
        self._raise_pending()

    async def _cancel_runner(self) -> None:
        runner = self._runner
        if runner is not None and not runner.done():
            if self._session is not None:
                # Gone, not closed: the request's end cancels the view at once.
                self._session.connection_lost()
            runner.cancel()
            await asyncio.wait({runner})

    async def _stop_runner(self) -> None:
        # After a refused handshake the request is finishing by itself (closing the body).
        runner = self._runner
        if runner is not None and not runner.done():
            await asyncio.wait({runner}, timeout=5.0)
        await self._cancel_runner()

    def _raise_runner_failure(self) -> None:
        runner = self._runner
        if runner is not None and runner.done() and not runner.cancelled():
            error = runner.exception()
            if error is not None:
                raise error

    async def __aenter__(self) -> WebSocketClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is None or self.response is None:
            return
        try:
            if self._close_sent is None and not self._dropped:
                await self.close()
            else:
                await self._end(2.0)
        except Exception as error:
            if exc is None:
                raise
            # The block's own failure is the one to see; keep ours as a note on it.
            exc.add_note(f"WebSocketClient({self.path!r}) on exit: {error!r}")
        finally:
            await self._cancel_runner()
