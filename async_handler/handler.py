"""``AsyncDjangoApplication``: Django's request path as a coroutine, behind a WSGI entry point.

Layer: Django glue.  Imports Django, asgiref and the stdlib-only :mod:`async_handler.threads` and
:mod:`async_handler.contract`; never the protocol or gunicorn.  The response bodies it returns
(content, sync and async streams) are in :mod:`async_handler.bodies`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Executor
from http.cookies import Morsel
from typing import TYPE_CHECKING, Any

import django
from django.apps import apps
from django.conf import settings
from django.core import signals
from django.core.cache import caches, close_caches
from django.core.cache.backends.base import BaseCache
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.base import reset_urlconf
from django.core.handlers.wsgi import WSGIHandler, get_path_info, get_script_name
from django.db import close_old_connections, connections, reset_queries
from django.db.backends.base.base import BaseDatabaseWrapper
from django.dispatch import Signal
from django.http import HttpRequest, HttpResponseBase
from django.urls import set_script_prefix
from django.utils.module_loading import import_string

from ._cycles import release
from ._hop import route_to, run_sync
from .bodies import _AsyncStream, _background, _BlockingAsyncStream, _ContentBody, _SyncStream
from .chain import build_async_chain
from .contract import ASYNC_KEY, POOL_KEY
from .sync_chain import AsyncViewGuess
from .threads import CallerThreadExecutor, Lease, ThreadPool, is_overflow_thread

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

__all__ = ["DEFAULT_THREADS", "AsyncDjangoApplication"]

#: Default size of the handler's own thread pool (setting ``ASYNC_HANDLER_THREADS``), used when
#: the server does not lend its pool: gthread's usual sizing.
DEFAULT_THREADS = 8

#: Overflow threads of the handler's own pool (see :mod:`async_handler.threads`): gunicorn's
#: default ``worker_connections``, the bound our worker passes for its own pool.
DEFAULT_OVERFLOW = 1000

logger = logging.getLogger("async_handler.handler")

_Body = Iterable[bytes] | AsyncIterator[bytes]


def _thread_connections() -> Sequence[BaseDatabaseWrapper]:
    """``connections.all(initialized_only=True)``, cheaply, for a thread that runs no loop.

    The lease hooks below run on pool threads around every hop, where Django's own lookup costs
    two asgiref ``Local`` reads per alias, each raising and catching ``RuntimeError`` in
    ``get_running_loop()``: 18% of the worker's CPU under 1,000 connections.  Without a running
    loop that ``Local`` (thread-critical) stores this thread's open connections on a plain
    ``threading.local``, which is read directly here.
    """
    storage = getattr(getattr(connections, "_connections", None), "_storage", None)
    if type(storage) is not threading.local or asyncio._get_running_loop() is not None:
        return connections.all(initialized_only=True)
    return [conn for conn in vars(storage).values() if isinstance(conn, BaseDatabaseWrapper)]


def _holds_connections() -> bool:
    # The unbind hook below only touches this thread's connections: without any it is skipped
    # (threads.Lease ``unbind_if``), and a request to a view that opened none costs its thread
    # one wake-up, not two.
    return bool(_thread_connections())


def _holds_thread_state() -> bool:
    # A database connection is thread-local: while a transaction is open on this thread the
    # request must keep the thread (see threads.Lease ``keep``).
    return any(conn.in_atomic_block for conn in _thread_connections())


# Django connects these to request_started / request_finished to manage the *current thread's*
# database connections.  Under a lease they run on the leased thread when the request binds to
# it and lets it go (threads.Lease on_bind / on_unbind) instead of costing a thread hop each.
_DB_HOUSEKEEPING = (close_old_connections, reset_queries)


def _is_housekeeping(receiver: Any) -> bool:
    if receiver in _DB_HOUSEKEEPING or receiver is reset_urlconf:
        # reset_urlconf only clears a context-local (asgiref Local): harmless on the loop, and
        # already done by the next request's set_urlconf.
        return True
    # Cache handles are context-local, not thread-local: only a request that opened one has
    # anything for close_caches to close.
    return receiver is close_caches and (
        _cache_close_is_noop() or not caches.all(initialized_only=True)
    )


# (the CACHES setting seen last, whether closing its caches is a no-op); holding the setting
# keeps its identity from being reused by another (override_settings swaps it in tests).
_noop_close: tuple[Any, bool] = (None, False)


def _cache_close_is_noop() -> bool:
    """Whether every configured cache backend keeps ``BaseCache.close``, which does nothing
    (locmem, file, database and dummy caches do; memcached and Redis close connections)."""
    global _noop_close
    configured = settings.CACHES
    seen, known = _noop_close
    if seen is not configured:
        try:
            known = all(
                import_string(config["BACKEND"]).close is BaseCache.close
                for config in configured.values()
            )
        except Exception:  # a broken CACHES setting fails where Django opens the cache
            known = False
        _noop_close = (configured, known)
    return known


# What a signal's receiver list needs, by the receivers' lookup keys (Django's
# ``(_make_id(receiver), _make_id(sender))``): nothing, the cache closer only when a cache was
# opened, or a real send.  Classifying once per receiver set keeps the request path from
# dereferencing and filtering the receivers on every request.
_SKIP, _CACHES_ONLY, _SEND = 0, 1, 2
_HOUSEKEEPING_IDS = frozenset(map(id, (*_DB_HOUSEKEEPING, reset_urlconf)))
_plans: dict[tuple[int, tuple[Any, ...]], int] = {}


def _plan(signal: Signal) -> int:
    # Whether close_caches can do anything depends on the CACHES setting, part of the key.
    keys = (_cache_close_is_noop(), *[entry[0] for entry in signal.receivers])
    plan = _plans.get((id(signal), keys))
    if plan is None:
        plan = _SKIP
        for receiver_id, _ in keys[1:]:
            if receiver_id == id(close_caches):
                if not keys[0]:
                    plan = _CACHES_ONLY
            elif receiver_id not in _HOUSEKEEPING_IDS:
                plan = _SEND
                break
        if len(_plans) >= 64:  # receivers connected per request would grow it without end
            _plans.clear()
        _plans[(id(signal), keys)] = plan
    return plan


def _on_bind() -> None:
    # reset_queries() and close_old_connections(), for this thread's connections.
    for conn in _thread_connections():
        conn.queries_log.clear()
        conn.close_if_unusable_or_obsolete()


def _on_unbind() -> None:
    if is_overflow_thread():
        # Persistent connections live on the pool's threads only, so that the worker holds at
        # most `threads` of them at rest: one opened by a request on an overflow thread closes
        # when that request lets the thread go.
        for conn in _thread_connections():
            try:
                conn.close()
            except Exception:
                logger.exception("Error closing database connection %r", conn.alias)
        return
    # close_old_connections(), for this thread's connections.
    for conn in _thread_connections():
        conn.close_if_unusable_or_obsolete()


if django.VERSION >= (6, 0):
    # Django 6.0 sends Morsel.OutputString(), without the leading space output(header="") gives.
    _cookie_value: Callable[[Morsel[str]], str] = Morsel.OutputString
else:

    def _cookie_value(cookie: Morsel[str]) -> str:
        return cookie.output(header="")


def _live_receivers(signal: Signal, sender: type) -> tuple[list[Any], list[Any]]:
    # Private API (sync and async lists since Django 5.0, unchanged through 6.1): Django has no
    # public way to send sync receivers in one hop and async ones on the loop.
    sync_receivers, async_receivers = signal._live_receivers(sender)
    return list(sync_receivers), list(async_receivers)


async def _send_signal(
    signal: Signal, sender: type, *, skip_housekeeping: bool, **named: Any
) -> None:
    """Send ``signal`` from a coroutine: sync receivers in one hop to the request's thread,
    async ones concurrently on the loop; no hop at all when only housekeeping is connected."""
    if not signal.receivers:
        return
    if skip_housekeeping:
        plan = _plan(signal)
        if plan == _SKIP or (plan == _CACHES_ONLY and not caches.all(initialized_only=True)):
            return
    sync_receivers, async_receivers = _live_receivers(signal, sender)
    if skip_housekeeping:
        sync_receivers = [r for r in sync_receivers if not _is_housekeeping(r)]

    def send_sync() -> None:
        for receiver in sync_receivers:
            receiver(signal=signal, sender=sender, **named)

    if sync_receivers:
        await run_sync(send_sync)
    if async_receivers:
        await asyncio.gather(
            *(receiver(signal=signal, sender=sender, **named) for receiver in async_receivers)
        )


class AsyncDjangoApplication(WSGIHandler):
    """A Django ``WSGIHandler`` whose request path is a coroutine.

    Use it in ``wsgi.py`` as ``application = AsyncDjangoApplication()``.  It behaves in two
    ways, chosen per request by the server contract (:mod:`async_handler.contract`):

    * On a loop-owning server (our gunicorn worker, our ``runserver``), ``__call__`` returns an
      awaitable.  The middleware chain, built once in async mode, runs on the server's loop:
      ``async def`` views are awaited inline, so many requests run concurrently on one loop.
      Sync views, sync-only middleware and ``MiddlewareMixin`` hooks run on a pool of long-lived
      threads, each request's sync code on one leased thread (:mod:`async_handler.threads`).
      A request to an ``async def`` view through a sync-only middleware (whose thread blocks
      while the view runs) takes an overflow thread beyond the pool instead; database
      connections opened there close when the request ends.
    * Anywhere else (``manage.py runserver`` without our app, gunicorn sync/gthread, wsgiref,
      mod_wsgi), ``__call__`` runs the same chain to completion and returns an ordinary WSGI
      iterable, as Django's ``WSGIHandler`` does.  The request's sync code runs on the server's
      thread; the coroutines on one background loop shared by the process.

    Constructing it calls ``django.setup()`` when the app registry is not ready yet, as
    ``get_wsgi_application()`` does.
    """

    #: Tells a contract-aware server that ``__call__`` may be awaited on its loop.
    async_handler_awaitable = True

    def __init__(self) -> None:
        if not apps.ready:
            django.setup(set_prefix=False)
        # Skip WSGIHandler.__init__: it builds a sync middleware chain, and we want exactly one
        # chain, in async mode (the sync fallback drives it from a background loop).
        super(WSGIHandler, self).__init__()
        #: Set by the async chain's build: the sync-only middleware that hold a thread across
        #: the inner chain (see async_handler.chain.build_async_chain).
        self._thread_blocking_middleware: tuple[str, ...] = ()
        self._async_view = AsyncViewGuess()
        self.load_middleware(is_async=True)
        size = getattr(settings, "ASYNC_HANDLER_THREADS", DEFAULT_THREADS)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ImproperlyConfigured(
                f"ASYNC_HANDLER_THREADS must be a positive integer, got {size!r}."
            )
        #: Threads for sync code when the server lends none (settings.ASYNC_HANDLER_THREADS).
        self.thread_pool = ThreadPool(size, name="django-sync", overflow=DEFAULT_OVERFLOW)
        self._hooked_pool: ThreadPool | None = None

    def async_handler_boot_warnings(self) -> list[str]:
        """The server contract's boot warnings: the ``async_handler.W003`` system check (groups
        in memory across several workers), which gunicorn never runs itself.

        Our worker exports ``ASYNC_HANDLER_WORKERS`` before calling this.  A check listed in
        ``SILENCED_SYSTEM_CHECKS`` stays silent here too.
        """
        from .apps import check_in_memory_groups

        silenced = set(getattr(settings, "SILENCED_SYSTEM_CHECKS", ()))
        return [
            f"{found.id}: {found.msg}" + (f" HINT: {found.hint}" if found.hint else "")
            for found in check_in_memory_groups()
            if found.id not in silenced
        ]

    def load_middleware(self, is_async: bool = False) -> None:
        """Build the middleware chain; the async one with hook-style hops fused.

        ``is_async=True`` builds what Django's ``load_middleware(is_async=True)`` builds, except
        that runs of ``MiddlewareMixin`` layers share thread hops (:mod:`async_handler.chain`).
        ``is_async=False`` is Django's own sync build, kept for callers that ask for it.
        """
        if is_async:
            build_async_chain(self)
        else:
            super().load_middleware(is_async)

    def __call__(  # type: ignore[override]
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Awaitable[_Body] | Iterable[bytes]:
        """Serve one request.

        With ``environ["async_handler.async"]`` set, return an awaitable for the server's loop
        whose result is the body (see :mod:`async_handler.contract`); the body has ``aclose()``,
        which the server must await.  Otherwise run the request to completion on the calling
        thread and return a WSGI iterable whose ``close()`` the server calls.
        """
        if environ.get(ASYNC_KEY):
            return self._serve_async(environ, start_response)
        return self._serve_sync(environ, start_response)

    async def get_response(self, request: HttpRequest) -> HttpResponseBase:  # type: ignore[override]
        """Return the response for ``request`` through the async middleware chain.

        Django names the sync entry point ``get_response`` and the async one
        ``get_response_async``.  This handler has only the async chain, so ``get_response`` is a
        coroutine here, equal to ``get_response_async``; it must be awaited on an event loop.
        """
        return await self.get_response_async(request)

    # -- the coroutine shared by both modes

    async def _respond(
        self,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        executor: Executor,
    ) -> HttpResponseBase:
        # Mirrors WSGIHandler.__call__, but awaits the chain, and still sends request_finished
        # when the view is cancelled (the client left, or the server's timeout expired), as
        # Django's ASGIHandler does since 5.0 (ticket #34572 made views see CancelledError).
        with route_to(executor):
            set_script_prefix(get_script_name(environ))
            skip = isinstance(executor, Lease)
            if isinstance(executor, Lease) and self._thread_blocking_middleware:
                # Before the first hop (request_started's receivers may make one): the lease
                # picks its kind of thread when it binds.
                executor.overflow = self._wants_overflow(get_path_info(environ) or "/")
            await _send_signal(
                signals.request_started, type(self), skip_housekeeping=skip, environ=environ
            )
            request: HttpRequest | None = None
            try:
                request = self.request_class(environ)
                response = await self.get_response(request)
            except BaseException:
                if request is not None:
                    request.close()
                await _send_signal(signals.request_finished, type(self), skip_housekeeping=skip)
                raise
            response._handler_class = type(self)  # type: ignore[attr-defined]
            status = f"{response.status_code} {response.reason_phrase}"
            headers = [
                *response.items(),
                *(("Set-Cookie", _cookie_value(c)) for c in response.cookies.values()),
            ]
            try:
                start_response(status, headers)
            except BaseException:
                # The server refused the headers (say, CR/LF in a value): still release
                # the response's resources and send request_finished.
                await self._close_response(response, executor)
                raise
            return response

    def _wants_overflow(self, path_info: str) -> bool:
        """Whether a request for ``path_info``, in a chain with a sync-only middleware, should
        bind to an overflow thread rather than queue for the pool.

        That middleware's thread blocks while the inner chain runs.  For an ``async def`` view
        that is the view's whole await, so the request gets an overflow thread: async views
        stay concurrent beyond ``threads``.  For a sync view the thread runs the view itself, as
        under gthread, so the request queues for the pool: sync views (and the database
        connections they open) stay bounded by ``threads``.  The view is looked up in the
        default URLconf here; a middleware that swaps ``request.urlconf`` only makes the guess
        wrong, never the response.
        """
        return self._async_view(path_info)

    async def _close_response(self, response: HttpResponseBase, executor: Executor) -> None:
        """``response.close()``, off the loop: resource closers, then ``request_finished``,
        routed (as asgiref's thread-sensitive calls) to ``executor``.

        When the only closer is the request's own (no uploaded files to close) and the response
        class keeps Django's ``close``, nothing here can block: run it on the loop and send the
        signal without a hop, then break Django's reference cycles in the request when nothing
        else holds it (:func:`async_handler._cycles.release`).
        """
        closers = response._resource_closers  # type: ignore[attr-defined]
        request_close = closers[0] if len(closers) == 1 else None
        request = getattr(request_close, "__self__", None)
        if (
            not isinstance(executor, Lease)
            or type(response).close is not HttpResponseBase.close
            or not isinstance(request, HttpRequest)
            or getattr(request, "_files", None)
        ):
            with route_to(executor):
                await run_sync(response.close)
            return
        request.close()
        closers.clear()
        request_close = None  # a bound method: one more reference to the request (see below)
        response.closed = True
        finished = signals.request_finished
        if finished.receivers and _plan(finished) != _SKIP:
            with route_to(executor):
                await _send_signal(finished, type(self), skip_housekeeping=True)
        # The request is over: free it now, by reference counting, rather than at the cyclic
        # collector's next run (async_handler._cycles).  This frame's `request` is the one
        # reference the proof must allow for.
        release(request, 1)

    # -- loop-owning server

    async def _serve_async(self, environ: WSGIEnvironment, start_response: StartResponse) -> _Body:
        pool: ThreadPool = environ.get(POOL_KEY) or self.thread_pool
        if pool is not self._hooked_pool:
            pool.add_exit_hook(connections.close_all)
            self._hooked_pool = pool
        lease = pool.lease(
            keep=_holds_thread_state,
            on_bind=_on_bind,
            on_unbind=_on_unbind,
            unbind_if=_holds_connections,
        )
        try:
            response = await self._respond(environ, start_response, lease)
        except BaseException:
            lease.release()
            raise

        # A WebSocket's 101 (async_handler.websocket): the request lasts as long as the socket,
        # and ends, as the contract says, when the server closes this body.
        finish = getattr(response, "_async_handler_finish", None)
        if finish is not None:
            lease.leave_overflow()  # the sync-only middleware is done with its thread

        async def close() -> None:
            try:
                if finish is not None:
                    try:
                        await finish()
                    finally:
                        # Even when the socket's end was cancelled (the worker stopping):
                        # request_finished is sent once per request, as for HTTP.
                        await self._close_response(response, lease)
                else:
                    await self._close_response(response, lease)
            finally:
                lease.release()

        if getattr(response, "file_to_stream", None) is not None and environ.get(
            "wsgi.file_wrapper"
        ):
            # Hand the file to the server (sendfile); response.close() closes it, as it is
            # registered among the response's resource closers.
            wrapper = environ["wsgi.file_wrapper"](
                response.file_to_stream,  # type: ignore[attr-defined]
                response.block_size,  # type: ignore[attr-defined]
            )
            try:
                wrapper.aclose = close
            except AttributeError:
                return _SyncStream(iter(wrapper), lease, close)
            return wrapper
        if not response.streaming:
            return _ContentBody(response.content, close)  # type: ignore[attr-defined]
        if response.is_async:  # type: ignore[attr-defined]
            return _AsyncStream(response, lease, close)
        return _SyncStream(iter(response.streaming_content), lease, close)  # type: ignore[attr-defined]

    # -- plain WSGI server

    def _serve_sync(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        executor = CallerThreadExecutor()
        response: HttpResponseBase = _background.run(
            executor, self._respond(environ, start_response, executor)
        )
        if getattr(response, "file_to_stream", None) is not None and environ.get(
            "wsgi.file_wrapper"
        ):
            # As WSGIHandler: the server closes the wrapper, which must close the response.
            response.file_to_stream.close = response.close  # type: ignore[attr-defined]
            return environ["wsgi.file_wrapper"](
                response.file_to_stream,  # type: ignore[attr-defined]
                response.block_size,  # type: ignore[attr-defined]
            )
        if response.streaming and response.is_async:  # type: ignore[attr-defined]
            # Django's own __iter__ would collect an async stream into one list; stream it.
            return _BlockingAsyncStream(response, executor)
        return response
