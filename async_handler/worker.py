"""The gunicorn worker: :mod:`async_handler.http` on an asyncio (or uvloop) loop.

Use it with ``gunicorn -k async_handler.worker.AsyncioWorker`` (or ``-k gaiohttp`` through the
entry point).  One loop per worker process serves every connection; contract applications
(:mod:`async_handler.contract`) run on the loop, plain WSGI applications on ``--threads``
long-lived threads.

gunicorn settings honoured: ``keepalive``, ``limit_request_line``, ``limit_request_fields``,
``limit_request_field_size``, ``forwarded_allow_ips``, ``secure_scheme_headers``, ``timeout``
(heartbeat, and the default request timeout), ``graceful_timeout``, ``worker_connections``,
``max_requests``/``max_requests_jitter``, ``threads``, ``certfile``/``keyfile`` (TLS),
``reload``, the ``pre_request``/``post_request``/``worker_int``/``worker_abort`` hooks and the
access log with ``access_log_format``.  ``SCRIPT_NAME`` comes from the environment, as in
gunicorn.  Knobs gunicorn lacks come from ``ASYNC_HANDLER_*`` environment variables, listed
and parsed in :mod:`async_handler.worker_config`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Mapping
from typing import Any

import httptools
from gunicorn.arbiter import Arbiter
from gunicorn.config import PostRequest, PreRequest
from gunicorn.http.wsgi import WSGIErrorsWrapper
from gunicorn.sock import ssl_context
from gunicorn.workers import base

from .contract import BOOT_WARNINGS_ATTR
from .http.config import ServerConfig
from .http.connection import HttpProtocol
from .http.server import ServerState
from .threads import ThreadPool
from .worker_config import (
    DEFAULT_GC_THRESHOLD,
    BootError,
    config_from_gunicorn,
    env_number,
    new_event_loop,
    tune_gc,
)

__all__ = ["AsyncioWorker", "BootError", "config_from_gunicorn", "new_event_loop", "tune_gc"]


class _RequestShim:
    """What gunicorn's ``Request`` offers hooks and the access log, rebuilt from the environ."""

    def __init__(self, environ: Mapping[str, Any]) -> None:
        uri: str = environ.get("RAW_URI", "")
        self.method: str = environ.get("REQUEST_METHOD", "")
        self.uri = uri
        target, _, self.fragment = uri.partition("#")
        self.path = target.partition("?")[0]
        self.query: str = environ.get("QUERY_STRING", "")
        self.version = (1, 0) if environ.get("SERVER_PROTOCOL") == "HTTP/1.0" else (1, 1)
        self.scheme: str = environ.get("wsgi.url_scheme", "http")
        self.remote_addr = (environ.get("REMOTE_ADDR", ""), environ.get("REMOTE_PORT", ""))
        self.peer_addr = self.remote_addr
        headers: list[tuple[str, str]] = []
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                headers.append((key[5:].replace("_", "-"), value))
            elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                headers.append((key.replace("_", "-"), value))
        self.headers = headers
        self.trailers: list[tuple[str, str]] = []
        self.body = environ.get("wsgi.input")
        self.proxy_protocol_info = None

    def should_close(self) -> bool:
        """gunicorn ``Request.should_close``: whether the client asked to close."""
        for name, value in self.headers:
            if name == "CONNECTION":
                return value.lower().strip() == "close"
        return self.version < (1, 1)


class _ResponseShim:
    """What gunicorn's ``Response`` offers ``post_request`` and the access log."""

    def __init__(self, status: str, headers: list[tuple[str, str]], sent: int) -> None:
        self.status = status
        try:
            self.status_code: int | None = int(status.split(None, 1)[0])
        except ValueError:
            self.status_code = None
        self.headers = headers
        self.sent = sent
        self.response_length = sent
        self.headers_sent = True


class AsyncioWorker(base.Worker):
    """gunicorn worker serving HTTP/1.1 from one asyncio loop per process.

    Lifecycle (gunicorn's worker contract): the loop is built in :meth:`init_process` before
    gunicorn's own setup, signals are handled on the loop, :meth:`run` accepts connections
    (never more than ``worker_connections``) and calls :meth:`notify` on a tick until the
    worker is told to stop; then it shuts down gracefully within ``graceful_timeout``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server_config: ServerConfig | None = None
        self.state: ServerState | None = None
        self.pool: ThreadPool | None = None
        self._quick = False
        self._wake: asyncio.Event | None = None
        self._handshaking = 0
        self._handshakes: set[asyncio.Future[Any]] = set()
        self._requests: dict[int, _RequestShim] = {}
        self._observe_end = True
        self._gc_threshold = DEFAULT_GC_THRESHOLD

    def _env(self) -> dict[str, str]:
        # gunicorn applies raw_env (cfg.env) to os.environ only inside super().init_process().
        env = dict(os.environ)
        env.update(self.cfg.env or {})
        return env

    def init_process(self) -> None:
        """Build the loop and validate the settings, then run gunicorn's worker setup
        (which loads the application and calls :meth:`run`)."""
        try:
            env = self._env()
            self.loop = new_event_loop(env.get("ASYNC_HANDLER_LOOP", "auto").strip().lower())
            self.server_config = config_from_gunicorn(self.cfg, env)
            self._gc_threshold = int(
                env_number(env, "ASYNC_HANDLER_GC_THRESHOLD", DEFAULT_GC_THRESHOLD, integer=True)
            )
        except BootError as exc:
            self.log.error("async_handler worker cannot boot: %s", exc)
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
        if self.cfg.header_map != "drop":
            self.log.warning(
                "header_map=%r is not supported by AsyncioWorker: header names containing '_' "
                "are always dropped",
                self.cfg.header_map,
            )
        asyncio.set_event_loop(self.loop)
        self._wake = asyncio.Event()
        super().init_process()

    def load_wsgi(self) -> None:
        """Load the application (a failure stops the arbiter with ``WORKER_BOOT_ERROR``), with
        ``ASYNC_HANDLER_WORKERS`` exported (``--workers``, which WEB_CONCURRENCY only defaults);
        then log its boot warnings (:data:`~async_handler.contract.BOOT_WARNINGS_ATTR`)."""
        os.environ["ASYNC_HANDLER_WORKERS"] = str(self.cfg.workers)
        try:
            super().load_wsgi()
        except Exception:
            self.log.exception("async_handler worker failed to load the application")
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
        boot_warnings = getattr(self.wsgi, BOOT_WARNINGS_ATTR, None)
        if callable(boot_warnings):
            try:
                for message in boot_warnings():
                    self.log.warning("%s", message)
            except Exception:
                self.log.exception("async_handler worker: the application's boot checks failed")

    def init_signals(self) -> None:
        """Install gunicorn's worker signals on the loop (no Python-level handlers)."""
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        loop = self.loop
        assert loop is not None
        loop.add_signal_handler(signal.SIGTERM, self._on_term)
        loop.add_signal_handler(signal.SIGINT, self._on_quit)
        loop.add_signal_handler(signal.SIGQUIT, self._on_quit)
        loop.add_signal_handler(signal.SIGUSR1, self.log.reopen_files)
        loop.add_signal_handler(signal.SIGABRT, self._on_abort)
        loop.add_signal_handler(signal.SIGWINCH, self._on_winch)

    def _wakeup(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _on_term(self) -> None:
        # Graceful: stop accepting, finish in-flight requests within graceful_timeout.
        self.alive = False
        self._wakeup()

    def _on_quit(self) -> None:
        # Quick: drop connections now (gunicorn's handle_quit).
        self.alive = False
        self._quick = True
        try:
            self.cfg.worker_int(self)
        except Exception:
            self.log.exception("worker_int hook failed")
        if self.state is not None:
            self.state.abort()
        self._wakeup()

    def _on_abort(self) -> None:
        self.alive = False
        self.cfg.worker_abort(self)
        sys.exit(1)

    def _on_winch(self) -> None:
        self.log.debug("worker: SIGWINCH ignored.")

    # -- hooks into the protocol (on the loop)

    def _request_start(self, environ: dict[str, Any]) -> None:
        req = _RequestShim(environ)
        self._requests[id(environ)] = req
        self.cfg.pre_request(self, req)

    def _hooks_observe_requests(self) -> tuple[bool, bool]:
        """Whether anything looks at requests at their start / at their end.

        gunicorn's default ``pre_request`` only logs at DEBUG, its default ``post_request``
        does nothing, and the access log may be off: then building the request and response
        views for them would be pure per-request overhead.
        """
        cfg = self.cfg
        error_log = getattr(self.log, "error_log", None)
        debug = error_log is None or error_log.isEnabledFor(logging.DEBUG)
        pre = debug or cfg.pre_request is not PreRequest.default
        # A custom logger_class without gunicorn >= 23's access_log_enabled: assume it logs.
        access = bool(getattr(self.log, "access_log_enabled", True))
        post = pre or access or cfg.post_request is not PostRequest.default
        return pre, post

    def _request_end(
        self,
        environ: dict[str, Any],
        status: str,
        headers: list[tuple[str, str]],
        sent: int,
        duration: float,
    ) -> None:
        if self._observe_end:
            req = self._requests.pop(id(environ), None) or _RequestShim(environ)
            resp = _ResponseShim(status, headers, sent)
            try:
                self.cfg.post_request(self, req, environ, resp)
            except Exception:
                self.log.exception("post_request hook failed")
            try:
                self.log.access(resp, req, environ, datetime.timedelta(seconds=duration))
            except Exception:
                self.log.exception("access log failed")
        self.nr += 1
        if self.nr >= self.max_requests and self.alive:
            self.log.info("Autorestarting worker after current request.")
            self.alive = False
            self._wakeup()

    # -- main loop

    def run(self) -> None:
        """Serve until told to stop; then shut down and close the loop."""
        loop = self.loop
        assert loop is not None
        # gunicorn calls run() once the application is loaded (load_wsgi): what exists now
        # lives as long as the worker.
        tune_gc(self._gc_threshold)
        try:
            loop.run_until_complete(self._serve())
        except Exception:
            self.log.exception("async_handler worker failed")
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                if self.pool is not None:
                    self.pool.shutdown()
                loop.close()

    def _tick(self) -> float:
        # The arbiter kills a worker that has not notified within `timeout`: notify at least
        # four times per timeout so one late tick never looks like a hang.
        timeout = float(self.timeout or 0)
        return max(0.05, min(1.0, timeout / 4)) if timeout > 0 else 1.0

    def _log_pool(self, pool: ThreadPool) -> None:
        """Log the pool size and the overflow bound at boot, and warn when gunicorn's default
        ``threads = 1`` leaves one thread for every sync view of this worker."""
        # Logged per worker, where the pool is built (not arbiter-side), so it sits beside the
        # worker's own boot lines and states what this process actually runs with.
        self.log.info(
            "async_handler worker: %d pool thread(s) for sync code (threads), up to %d overflow "
            "thread(s) for async views behind sync-only middleware (worker_connections)",
            pool.size,
            pool.overflow,
        )
        # Which loop really runs matters for performance claims and bug reports: `auto` falls
        # back to asyncio silently when uvloop is not installed.
        self.log.info(
            "async_handler worker: %s.%s event loop, httptools %s",
            type(self.loop).__module__,
            type(self.loop).__name__,
            httptools.__version__,
        )
        if pool.size <= 1:
            self.log.warning(
                "async_handler worker with threads = 1 (gunicorn's default): sync views run "
                "one request at a time on this worker; set threads (--threads 8, or "
                "threads = 8 in the config file) to the number of requests that may run sync "
                "code at once"
            )

    async def _serve(self) -> None:
        cfg = self.cfg
        config = self.server_config
        assert config is not None and self._wake is not None
        self.pool = ThreadPool(
            max(1, cfg.threads),
            name=f"async-handler-{os.getpid()}",
            overflow=max(1, int(cfg.worker_connections)),
        )
        self._log_pool(self.pool)
        errors: Any = WSGIErrorsWrapper(cfg)
        observe_start, self._observe_end = self._hooks_observe_requests()
        self.state = ServerState(
            config,
            pool=self.pool,
            log=self.log,
            on_request_start=self._request_start if observe_start else None,
            on_request_end=self._request_end,
            errors=errors,
        )
        tls = ssl_context(cfg) if cfg.is_ssl else None
        accepting = [
            asyncio.ensure_future(self._accept_loop(listener, tls)) for listener in self.sockets
        ]
        tick = self._tick()
        while self.alive:
            self.notify()
            if self.ppid != os.getppid():
                self.log.info("Parent changed, shutting down: %s", self)
                self.alive = False
                break
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), tick)
        for task in accepting:
            task.cancel()
        await asyncio.gather(*accepting, return_exceptions=True)
        # Plain connections finish their setup (it is immediate); TLS handshakes still running
        # have no request yet and are dropped.
        for handshake in list(self._handshakes):
            if tls is not None:
                handshake.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)
        # The arbiter SIGKILLs a worker still running graceful_timeout after it signalled it:
        # keep a share of that time for cancelled requests to clean up (close their bodies,
        # send request_finished, end their WebSocket views).
        reserve = min(2.0, float(self.cfg.graceful_timeout) / 4)
        await self._shutdown(tick, reserve)
        # Let cancelled request tasks run their cleanup (body close, hooks) before the loop
        # closes, instead of being destroyed pending.
        current = asyncio.current_task()
        leftovers = [t for t in asyncio.all_tasks() if t is not current]
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.wait(leftovers, timeout=max(0.1, reserve / 2))

    async def _shutdown(self, tick: float, reserve: float) -> None:
        state = self.state
        assert state is not None
        if self._quick:
            state.abort()
        else:
            state.shutdown()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + float(self.cfg.graceful_timeout) - reserve
            # Keep the heartbeat going while requests finish: the arbiter enforces
            # graceful_timeout itself.
            while state.busy and not self._quick:
                self.notify()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self.log.warning(
                        "Graceful timeout: dropping %d connection(s), %d request(s) running",
                        len(state.connections),
                        len(state.requests),
                    )
                    break
                await state.wait_closed(min(tick, remaining))
            state.abort()
        await state.wait_closed(max(0.1, reserve / 2))

    async def _accept_loop(self, listener: Any, tls: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        sock: socket.socket = getattr(listener, "sock", listener)
        sock.setblocking(False)
        state = self.state
        assert state is not None
        limit = max(1, int(self.cfg.worker_connections))
        app = self.wsgi

        def factory() -> HttpProtocol:
            return HttpProtocol(app, state)

        while self.alive:
            # worker_connections: past the limit, leave new connections in the listen backlog
            # (another worker, or this one later, accepts them).
            while len(state.connections) + self._handshaking >= limit:
                if self._handshakes:
                    # Connections still being set up count against the limit: let them land.
                    await asyncio.wait(
                        set(self._handshakes), timeout=0.1, return_when=asyncio.FIRST_COMPLETED
                    )
                else:
                    await state.wait_below(limit, timeout=0.1)
            # Wait for readiness, then accept synchronously.  Awaiting loop.sock_accept() instead
            # loses a connection at shutdown: the loop accepts it, and a cancel landing before
            # the task resumes drops the socket (the client sees a reset; seen on HUP under load).
            await _readable(loop, sock)
            # Drain the backlog in one go: one accept per loop iteration starves new clients
            # while busy connections fill every iteration (wrk measured a 400-700 ms p99 at
            # start-up); asyncio's own servers likewise accept up to their backlog per event.
            while self.alive and len(state.connections) + self._handshaking < limit:
                try:
                    conn, _ = sock.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    break
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        # Out of descriptors or memory: back off instead of spinning.
                        self.log.error("accept() failed: %s", exc)
                        await asyncio.sleep(0.1)
                        break
                    raise
                self._start_connection(conn, factory, tls)

    def _start_connection(
        self, conn: socket.socket, factory: Callable[[], HttpProtocol], tls: ssl.SSLContext | None
    ) -> None:
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A task of its own, tracked until done: cancelling the accept loop at shutdown must not
        # tear down a transport half set up (its request would be lost without an answer), and a
        # TLS handshake takes round trips that must never stall accepting.
        self._handshaking += 1
        task = asyncio.ensure_future(self._handshake(factory, conn, tls))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(
        self, factory: Any, conn: socket.socket, tls: ssl.SSLContext | None
    ) -> None:
        loop = asyncio.get_running_loop()
        config = self.server_config
        assert config is not None
        try:
            if tls is None:
                await loop.connect_accepted_socket(factory, conn)
            else:
                await loop.connect_accepted_socket(
                    factory, conn, ssl=tls, ssl_handshake_timeout=config.header_timeout
                )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            self.log.debug("connection dropped during setup: %s", exc)
            conn.close()
        except asyncio.CancelledError:
            conn.close()
            raise
        finally:
            self._handshaking -= 1


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Return once ``sock`` is readable (a listening socket: a connection is waiting)."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = sock.fileno()
    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
