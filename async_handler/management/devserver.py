"""The pieces of the asyncio ``runserver``: static files, request log lines, binding, serving.

Layer: developer server.  It imports Django and :mod:`async_handler.protocol`; the protocol never
imports it back.  The ``runserver`` command in :mod:`async_handler.management.commands.runserver`
wires these together; they live here because every module under ``commands/`` is a command.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from django.contrib.staticfiles.handlers import StaticFilesHandler
from django.core.handlers.wsgi import WSGIHandler, get_path_info

from ..contract import ASYNC_KEY, AWAITABLE_ATTR, POOL_KEY
from ..threads import ThreadPool

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = [
    "AsyncStaticFilesHandler",
    "bind_socket",
    "is_awaitable_app",
    "log_request",
    "request_line",
    "run_until_exit",
    "serve_forever",
    "static_files_handler",
]

#: Django's development-server logger: its default config prints ``[time] message`` lines,
#: coloured by the ``status_code`` attribute (django.utils.log.ServerFormatter).
logger = logging.getLogger("django.server")


def is_awaitable_app(app: object) -> bool:
    """Whether ``app`` declares the server contract (see :mod:`async_handler.contract`)."""
    return bool(getattr(app, AWAITABLE_ATTR, False))


class AsyncStaticFilesHandler(StaticFilesHandler):
    """Django's ``StaticFilesHandler`` that keeps the server contract of the app it wraps.

    A plain WSGI wrapper hides the contract attribute, so every request, async views included,
    would run in a pool thread.  This wrapper carries the attribute: called on the server's loop
    (``environ["async_handler.async"]`` set) it returns the wrapped application's awaitable for
    every path outside ``STATIC_URL``, and an awaitable that serves the static file on one of
    the server's pool threads for the rest.  Called without the key it is exactly
    ``StaticFilesHandler``.  Only wrap applications that honour the contract themselves.
    """

    async_handler_awaitable = True

    def __init__(self, application: WSGIHandler) -> None:
        if not is_awaitable_app(application):
            raise TypeError(
                f"AsyncStaticFilesHandler needs an application that honours the async_handler "
                f"contract; {application!r} does not (wrap it in StaticFilesHandler instead)"
            )
        super().__init__(application)

    def __call__(  # type: ignore[override]
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes] | Awaitable[Iterable[bytes]]:
        """Serve a static file, or pass the request on; awaitable when the server asks for it."""
        if not environ.get(ASYNC_KEY):
            return super().__call__(environ, start_response)
        if not self._should_handle(get_path_info(environ)):
            return self.application(environ, start_response)
        return self._serve_static(environ, start_response)

    async def _serve_static(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        # WSGIHandler.__call__ runs Django's request cycle (signals, request object) around
        # StaticFilesHandlerMixin.get_response, which is the blocking file lookup: a thread's job.
        # Its result is the server's wsgi.file_wrapper for a found file, so sendfile still works.
        def run() -> Iterable[bytes]:
            return WSGIHandler.__call__(self, environ, start_response)

        pool: ThreadPool | None = environ.get(POOL_KEY)
        if pool is None:
            return await asyncio.get_running_loop().run_in_executor(None, run)
        return await asyncio.wrap_future(pool.run(run))


def static_files_handler(application: WSGIHandler) -> WSGIHandler:
    """Wrap ``application`` to serve ``STATIC_URL``, keeping its async contract if it has one."""
    if is_awaitable_app(application):
        return AsyncStaticFilesHandler(application)
    return StaticFilesHandler(application)


def request_line(environ: WSGIEnvironment) -> str:
    """The request line as the client sent it, rebuilt from ``environ`` when the server kept
    no raw copy (``RAW_URI`` is gunicorn's name for the raw target)."""
    target = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if not target:
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        # PATH_INFO is decoded latin-1 text (PEP 3333); quote it back the way a client sends it.
        target = quote(path.encode("latin-1"), safe="/:@!$&'()*+,;=~-._")
        if environ.get("QUERY_STRING"):
            target += "?" + environ["QUERY_STRING"]
    return f"{environ.get('REQUEST_METHOD', '-')} {target} {environ.get('SERVER_PROTOCOL', '-')}"


def log_request(
    environ: WSGIEnvironment,
    status: str,
    headers: list[tuple[str, str]],
    length: int,
    duration: float,
) -> None:
    """Log one finished request to ``django.server``: ``"GET /path HTTP/1.1" 200 123``.

    The level follows Django's own server: error for 5xx, warning for 4xx, info otherwise.
    """
    code_text = status.split(" ", 1)[0]
    extra: dict[str, Any] = {
        "request": None,
        "server_time": time.strftime("%d/%b/%Y %H:%M:%S"),
    }
    level = logging.INFO
    if code_text.isdigit() and len(code_text) == 3:
        code = int(code_text)
        extra["status_code"] = code
        if code >= 500:
            level = logging.ERROR
        elif code >= 400:
            level = logging.WARNING
    logger.log(level, '"%s" %s %s', request_line(environ), code_text, length, extra=extra)


def bind_socket(host: str, port: int, ipv6: bool) -> socket.socket:
    """Return a listening TCP socket on ``(host, port)``; ``OSError`` when that is impossible.

    ``host`` may be a name; it resolves in the IPv6 family with ``ipv6``, else IPv4, as Django's
    server binds.  ``SO_REUSEADDR`` lets the autoreloader's next process bind while connections
    of the previous one linger in TIME_WAIT.
    """
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    if not infos:  # pragma: no cover - getaddrinfo raises instead of answering nothing
        raise OSError(f"cannot resolve {host!r}")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        # socketserver's default backlog would be 5; a burst of concurrent clients needs more.
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_forever(
    app: WSGIApplication,
    sock: socket.socket,
    pool: ThreadPool,
    on_request_end: Callable[[WSGIEnvironment, str, list[tuple[str, str]], int, float], None],
    websocket_code: Callable[[], int] = lambda: 1001,
) -> None:
    """Serve ``app`` on the listening ``sock`` until cancelled, then close gracefully.

    ``on_request_end(environ, status, headers, body_bytes, seconds)`` runs on the loop after
    each response (see :data:`async_handler.protocol.OnRequestEnd`); the protocol's own
    messages go to the ``django.server`` logger, so they show in the runserver console.
    Open WebSockets are closed with ``websocket_code()``: 1001 (Going Away) by default.
    """
    # Imported here: the protocol is only needed once the server really starts.
    from ..protocol import serve

    server = await serve(app, sock=sock, pool=pool, log=logger)
    server.state.on_request_end = on_request_end
    try:
        await asyncio.get_running_loop().create_future()
    finally:
        server.close(websocket_code=websocket_code())
        # Requests in flight get a moment to finish, then are dropped: Django's own server exits
        # at once (daemon threads), and an open event stream would never end by itself.
        await server.wait_closed(timeout=1.0)


#: Under the autoreloader: how long the process's exit waits for the server to close (the
#: second of grace :func:`serve_forever` gives requests in flight, then the abort).
EXIT_GRACE = 3.0


def run_until_exit(
    app: WSGIApplication,
    sock: socket.socket,
    pool: ThreadPool,
    on_request_end: Callable[[WSGIEnvironment, str, list[tuple[str, str]], int, float], None],
) -> None:
    """Run :func:`serve_forever` on a new loop in this thread until the process stops.

    In the main thread (``--noreload``) Ctrl-C cancels it through ``asyncio.run``, and open
    WebSockets get 1001 (Going Away).  Under the autoreloader this thread is a daemon, which the
    interpreter would kill at exit with every connection cut (clients see 1006): Ctrl-C and
    reloads both end the process from the main thread.  An ``atexit`` hook then cancels the
    server and waits up to :data:`EXIT_GRACE` for its graceful close; sockets get 1012 (Service
    Restart) when a Python file changed, since the process comes straight back, else 1001.
    """
    if threading.current_thread() is threading.main_thread():
        asyncio.run(serve_forever(app, sock, pool, on_request_end))
        return

    from django.utils.autoreload import file_changed

    reloading = False

    def changed(file_path: Any = None, **kwargs: Any) -> None:
        # Returns None: the autoreloader restarts unless a receiver claims the change, and a
        # .py file is never claimed (templates and .mo files are).
        nonlocal reloading
        reloading = reloading or str(file_path).endswith(".py")

    file_changed.connect(changed, weak=False)
    running: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[None]]] = []
    stopped = threading.Event()
    exiting = threading.Event()

    def websocket_code() -> int:
        return 1012 if reloading else 1001

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        running.append((asyncio.get_running_loop(), task))
        await serve_forever(app, sock, pool, on_request_end, websocket_code)

    def stop_at_exit() -> None:
        exiting.set()
        if running and not stopped.is_set():
            loop, task = running[0]
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(task.cancel)
                stopped.wait(EXIT_GRACE)

    atexit.register(stop_at_exit)
    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        pass  # stopped by stop_at_exit
    finally:
        stopped.set()
        file_changed.disconnect(changed)
        if not exiting.is_set():
            atexit.unregister(stop_at_exit)
