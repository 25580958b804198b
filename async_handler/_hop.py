"""One thread hop: asgiref's thread-sensitive ``sync_to_async`` call, without its general cost.

Layer: Django glue (asgiref and the stdlib; no Django).

Every request served by :class:`~async_handler.handler.AsyncDjangoApplication` runs inside a
``ThreadSensitiveContext`` whose executor is the request's lease (or, in the plain-WSGI fallback,
the calling thread).  For such a call ``sync_to_async(fn)(*args)`` spends about as long on its own
bookkeeping (executor lookup, ``run_in_executor``, ``asyncio.shield``, wrapper closures) as the
thread round trip itself: some 50 µs of a 110 µs hop measured here.  :func:`run_sync` makes the
same call with the same observable behaviour and queues it straight on the lease:

* the same thread (it resolves the executor exactly as ``SyncToAsync`` does, and defers to
  ``sync_to_async`` whenever that is not a :class:`~async_handler.threads.Lease`, as in the
  plain-WSGI fallback);
* the same context handling: ``fn`` runs in a copy of the caller's context, and context
  variables it sets (Django's active translation and urlconf live in asgiref ``Local`` objects)
  are copied back to the caller afterwards;
* the same thread-locals, so ``async_to_sync`` inside ``fn`` runs its coroutine on the caller's
  loop and routes nested ``sync_to_async`` calls back to this thread;
* ``sys.exc_info()`` inside ``fn`` shows the exception the caller is handling, as Django's
  ``response_for_exception`` expects.

On cancellation it differs deliberately: a call not yet started is dropped, and a running one is
waited for before ``CancelledError`` propagates, so the request's clean-up never overlaps it.
asgiref raises at once and leaves the call running (sync code cannot be interrupted).
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from asgiref.sync import (
    AsyncToSync,
    SyncToAsync,
    ThreadSensitiveContext,
    async_to_sync,
    sync_to_async,
)

from .threads import Lease, serve_until_woken

try:  # asgiref >= 3.13 tags a Local's storage with the thread that owns it (private API).
    from asgiref.local import _Storage
except ImportError:  # asgiref < 3.13: a Local's storage is a plain dict
    _Storage = None  # type: ignore[misc,assignment]

if _Storage is None:
    try:  # asgiref's own context hand-back (private, present in every release since 3.2).
        from asgiref.sync import _restore_context
    except ImportError:  # pragma: no cover - guards a future asgiref

        def _restore_context(context: contextvars.Context) -> None:
            for var, value in context.items():
                try:
                    if var.get() is not value:
                        var.set(value)
                except LookupError:
                    var.set(value)

else:

    def _restore_context(context: contextvars.Context) -> None:
        """asgiref's ``_restore_context``: copy ``context``'s values into the current one,
        re-homing Local storage to this thread.

        asgiref re-homes every storage into a new object, so every Local's variable is set on
        every hand-back.  Here a storage this thread already holds for the same data is left in
        place: after a hop nothing changed in most of them, and those sets were 3% of the
        loop's time per sync request.
        """
        here = threading.get_ident()
        for var, value in context.items():
            if type(value) is _Storage:
                current = var.get(None)
                if (
                    type(current) is _Storage
                    and current.thread_id == here
                    and current.data is value.data
                ):
                    continue
                var.set(value if value.thread_id == here else _Storage(here, value.data))
                continue
            try:
                if var.get() is value:
                    continue
            except LookupError:
                pass
            var.set(value)


__all__ = ["request_executor", "route_to", "run_on_loop", "run_sync"]

_T = TypeVar("_T")

_threadlocal = SyncToAsync.threadlocal

# AsyncToSync.executors is an asgiref Local; reading a missing attribute through it takes an
# RLock and builds an AttributeError (with the Local's repr): about 10% of the loop's time per
# request in a profile under 1,000 connections, for a value that is almost always unset.  Its
# backing ContextVar holds a dict (asgiref < 3.13) or a thread-tagged _Storage whose ``data``
# is that dict (>= 3.13, which hides storage inherited by another thread).
_executors_var = getattr(getattr(AsyncToSync.executors, "_storage", None), "_data", None)


def _current_thread_executor() -> Any:
    """``getattr(AsyncToSync.executors, "current", None)``, without the Local's overhead."""
    if not isinstance(_executors_var, contextvars.ContextVar):  # pragma: no cover - other asgiref
        return getattr(AsyncToSync.executors, "current", None)
    stored = _executors_var.get(None)
    if stored is None:
        return None
    if isinstance(stored, dict):
        return stored.get("current")
    if getattr(stored, "thread_id", None) != threading.get_ident():
        return None
    return stored.data.get("current")


class route_to:
    """Send the thread-sensitive ``sync_to_async`` calls made in the block to ``executor``.

    What entering ``ThreadSensitiveContext(executor=executor)`` does, as a plain context
    manager that works on every asgiref this package supports (the ``executor`` argument is new
    in 3.13) and skips what costs most on the request path: asgiref writes its
    ``AsyncToSync.executors`` ``Local`` on entry and on exit, here only when there is an
    inherited executor to hide.
    """

    __slots__ = ("_executor", "_hidden", "_key", "_token")

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._key = ThreadSensitiveContext()
        self._hidden: Any = None
        self._token: contextvars.Token[Any] | None = None

    def __enter__(self) -> None:
        key = self._key
        self._token = SyncToAsync.thread_sensitive_context.set(key)
        SyncToAsync.context_to_thread_executor[key] = self._executor
        # Under async_to_sync an inherited CurrentThreadExecutor would win over the context in
        # SyncToAsync and send calls to the thread blocked in async_to_sync: hide it (asgiref
        # 3.13 does the same).
        hidden = _current_thread_executor()
        if hidden is not None:
            self._hidden = hidden
            AsyncToSync.executors.current = None

    def __exit__(self, *exc_info: object) -> None:
        key = self._key
        SyncToAsync.context_to_thread_executor.pop(key, None)
        if self._token is not None:
            SyncToAsync.thread_sensitive_context.reset(self._token)
            self._token = None
        if self._hidden is not None:
            AsyncToSync.executors.current = self._hidden
            self._hidden = None
        if hasattr(key, "_exited"):
            # asgiref >= 3.13 then refuses calls from tasks that outlive the block, instead of
            # giving them a thread of their own.
            key._exited = True


def request_executor() -> Executor | None:
    """The executor the enclosing :class:`route_to` block routes to (even where an
    ``async_to_sync`` above takes precedence for now), or ``None`` outside one."""
    context = SyncToAsync.thread_sensitive_context.get(None)
    if context is None:
        return None
    return SyncToAsync.context_to_thread_executor.get(context)


def _executor() -> Executor | None:
    """The executor ``sync_to_async`` would pick for a thread-sensitive call made here, when it
    comes from a ``ThreadSensitiveContext``; ``None`` in every other case."""
    if _current_thread_executor() is not None:
        return None
    context = SyncToAsync.thread_sensitive_context.get(None)
    if context is None:
        return None
    return SyncToAsync.context_to_thread_executor.get(context)


async def run_sync(fn: Callable[..., _T], *args: Any) -> _T:
    """``await sync_to_async(fn)(*args)``, thread-sensitive: run ``fn`` on the request's thread."""
    lease = _executor()
    if not isinstance(lease, Lease):
        return await sync_to_async(fn)(*args)
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    # AsyncToSync registers the task it starts on our loop here, so that a cancel reaches it.
    tasks: list[asyncio.Task[Any]] = []
    call = lease.call(_in_thread, loop, tasks, sys.exc_info()[1], context, fn, args)
    try:
        return await call.waiter
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        if not call.cancel():
            await call.wait()
        raise
    finally:
        _restore_context(context)


def _in_thread(
    loop: asyncio.AbstractEventLoop,
    tasks: list[asyncio.Task[Any]],
    handling: BaseException | None,
    context: contextvars.Context,
    fn: Callable[..., _T],
    args: tuple[Any, ...],
) -> _T:
    # What SyncToAsync.thread_handler sets up for AsyncToSync.
    _threadlocal.main_event_loop = loop
    _threadlocal.main_event_loop_pid = os.getpid()
    _threadlocal.task_context = tasks
    if handling is None:
        return context.run(_call, context, fn, args)
    try:
        raise handling
    except BaseException:
        return context.run(_call, context, fn, args)


def _call(context: contextvars.Context, fn: Callable[..., _T], args: tuple[Any, ...]) -> _T:
    # Inside the copied context, on the request's thread: asgiref >= 3.13 re-homes Local
    # storage to this thread here, or Django's translation and urlconf state would look unset.
    _restore_context(context)
    return fn(*args)


def run_on_loop(fn: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T:
    """``async_to_sync(fn)(*args, **kwargs)`` from the request's thread, minus asgiref's costs.

    Called on a pool thread inside a :func:`run_sync` call (a sync-only middleware calling the
    async rest of its chain, a sync chain calling an ``async def`` view), it starts the
    coroutine as a task on the request's loop and keeps this thread serving the request's
    thread-sensitive calls until the task is done (:func:`~async_handler.threads.
    serve_until_woken`): one ``call_soon_threadsafe`` in, one queue put back, where asgiref adds
    a ``CurrentThreadExecutor``, futures and wrappers.  It keeps ``AsyncToSync``'s behaviour:
    the task runs in a copy of this thread's context and its changes are copied back; it sees
    the exception being handled here as ``sys.exc_info()``; the calling ``run_sync`` cancels it
    when the request is cancelled, and its exception (``CancelledError`` included) is raised
    here.  Anywhere else (no loop recorded for this thread, or no pool thread) it is asgiref's.
    """
    loop: asyncio.AbstractEventLoop | None = getattr(_threadlocal, "main_event_loop", None)
    if loop is None or loop.is_closed():
        return async_to_sync(fn)(*args, **kwargs)
    context = contextvars.copy_context()
    # Nested run_sync calls served below overwrite these thread-locals with their own.
    tasks: list[asyncio.Task[Any]] | None = getattr(_threadlocal, "task_context", None)
    pid = getattr(_threadlocal, "main_event_loop_pid", None)
    handling = sys.exc_info()[1]
    done: list[asyncio.Task[_T]] = []

    def start(wake: Callable[[], None]) -> None:
        def finish(task: asyncio.Task[_T]) -> None:
            done.append(task)
            wake()

        def begin() -> None:
            task = loop.create_task(_awaiting(handling, fn, args, kwargs), context=context)
            if tasks is not None:
                tasks.append(task)
            task.add_done_callback(finish)

        loop.call_soon_threadsafe(begin)

    if not serve_until_woken(start):
        return async_to_sync(fn)(*args, **kwargs)
    _threadlocal.main_event_loop = loop
    _threadlocal.main_event_loop_pid = pid
    _threadlocal.task_context = tasks
    task = done[0]
    if tasks is not None and task in tasks:
        tasks.remove(task)
    _restore_context(context)
    return task.result()


async def _awaiting(
    handling: BaseException | None,
    fn: Callable[..., Awaitable[_T]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> _T:
    if handling is None:
        return await fn(*args, **kwargs)
    try:
        raise handling
    except BaseException:
        return await fn(*args, **kwargs)
