"""Long-lived threads for sync code, leased per request with thread affinity.

Django's thread-sensitive mode wants all sync code of one request on one thread, because database
connections are thread-local.  Django's ASGI handler gets that by giving every request a new
``ThreadPoolExecutor(max_workers=1)`` (a thread per request, and a leaked connection per thread
with ``CONN_MAX_AGE``).  Here a request instead *leases* one thread of a fixed pool:

* The lease binds lazily, on the first call submitted to it: a request that never runs sync code
  never holds a thread, so async requests are not capped by the pool size.
* Once bound, every call of the lease runs on that thread, in order.  A bound lease keeps its
  thread while it is idle, as long as no other lease is waiting for one.
* When every thread is taken and a lease needs one, a thread whose lease is idle *and* holds no
  thread-bound state (its ``keep`` predicate, e.g. "a transaction is open", returns false) is
  handed over.  The lease it came from re-binds on its next call, preferring its old thread.
  Otherwise the newcomer waits, FIFO.  A thread busy in one request's call is never shared.

A lease made with ``overflow=True`` (a request whose thread will block for its whole life, say
in a sync-only middleware wrapping an async view) binds instead to an *overflow* thread: one of
an elastic set beside the pool, created on demand up to ``overflow`` threads, reused by later
overflow leases, and stopped after ``overflow_idle`` seconds without work.  Such a lease keeps
its thread until it is released (it is never handed over).  When every overflow thread is taken
it falls back to the pool, and queues there like any other lease.  Code can tell it runs on one
with :func:`is_overflow_thread` (the Django handler closes database connections opened there).

This module is stdlib-only: the protocol uses it for plain WSGI applications and the Django
handler for its sync middleware and views.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

from .thread_calls import CallerThreadExecutor, LoopCall, WorkItem, serve_from, serve_until_woken

__all__ = [
    "CallerThreadExecutor",
    "Lease",
    "LoopCall",
    "ThreadPool",
    "is_overflow_thread",
    "serve_until_woken",
]

_P = ParamSpec("_P")
_T = TypeVar("_T")

_Hook = Callable[[], object]

logger = logging.getLogger("async_handler.threads")

_local = threading.local()


def is_overflow_thread() -> bool:
    """Whether the calling thread is an overflow thread of some :class:`ThreadPool`."""
    return getattr(_local, "overflow", False)


class _Worker:
    __slots__ = ("ident", "overflow", "queue", "thread")

    def __init__(self, pool: ThreadPool, name: str, overflow: bool = False) -> None:
        self.queue: queue.SimpleQueue[WorkItem | None] = queue.SimpleQueue()
        self.ident = 0
        self.overflow = overflow
        self.thread = threading.Thread(
            target=pool._run_worker, args=(self,), name=name, daemon=True
        )


class ThreadPool:
    """A fixed number of long-lived threads, handed out through :meth:`lease`.

    Threads start lazily, up to ``size``, and live until :meth:`shutdown`.  All methods are
    thread-safe and never block, so they may be called from an event loop.
    """

    def __init__(
        self,
        size: int,
        name: str = "async-handler",
        overflow: int = 0,
        overflow_idle: float = 60.0,
    ) -> None:
        """``size`` pool threads; up to ``overflow`` more for ``overflow=True`` leases, each
        stopped after ``overflow_idle`` seconds without a lease."""
        if size < 1:
            raise ValueError(f"ThreadPool size must be at least 1, got {size!r}")
        if overflow < 0:
            raise ValueError(f"ThreadPool overflow must not be negative, got {overflow!r}")
        if overflow_idle <= 0:
            raise ValueError(f"ThreadPool overflow_idle must be positive, got {overflow_idle!r}")
        self.size = size
        self.name = name
        self.overflow = overflow
        self.overflow_idle = overflow_idle
        # Overflow threads: all alive ones, and the free ones (most recently used last, so the
        # warm ones are reused and the others age out).
        self._overflow: set[_Worker] = set()
        self._overflow_free: list[_Worker] = []
        self._overflow_created = 0
        self._overflow_peak = 0
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._free: list[_Worker] = []
        # Bound threads whose lease is idle and releasable, oldest first: candidates to hand over.
        self._idle_bound: collections.OrderedDict[_Worker, Lease] = collections.OrderedDict()
        self._waiting: collections.deque[Lease] = collections.deque()
        self._exit_hooks: list[_Hook] = []
        self._shutdown = False

    def add_exit_hook(self, hook: _Hook) -> None:
        """Run ``hook`` on every thread as it stops at :meth:`shutdown` (once per hook).

        The Django handler closes each thread's database connections this way, so that a
        worker's graceful exit does not drop them on the server's floor.
        """
        with self._lock:
            if hook not in self._exit_hooks:
                self._exit_hooks.append(hook)

    def lease(
        self,
        keep: Callable[[], bool] | None = None,
        on_bind: _Hook | None = None,
        on_unbind: _Hook | None = None,
        overflow: bool = False,
        unbind_if: Callable[[], bool] | None = None,
    ) -> Lease:
        """Return a new, unbound lease.

        With ``overflow`` the lease binds to an overflow thread (see the module docstring) when
        the pool has one to give, and keeps it until released; ``keep`` is then moot.

        ``keep`` runs on the leased thread after each call; while it returns true the lease keeps
        its thread even when other leases wait (use it for thread-bound state such as an open
        database transaction).  ``on_bind`` runs on a thread each time the lease binds to it,
        before the lease's first call there; ``on_unbind`` runs on it when the lease lets it go
        (release or hand-over), before anybody else's call.  ``unbind_if`` runs on the leased
        thread after each call too: when its last answer was false, ``on_unbind`` has nothing
        to do and is skipped, which spares the thread a wake-up once its request is over.
        Errors in hooks are logged.
        """
        return Lease(self, keep, on_bind, on_unbind, overflow, unbind_if)

    def run(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        """Run one call on any thread of the pool (a one-shot lease)."""
        lease = Lease(self)
        try:
            return lease.submit(fn, *args, **kwargs)
        finally:
            lease.release()

    @property
    def threads_started(self) -> int:
        """How many threads the pool has started so far (never more than ``size``)."""
        return len(self._workers)

    @property
    def overflow_started(self) -> int:
        """How many overflow threads the pool has ever started (retired ones included)."""
        return self._overflow_created

    @property
    def overflow_alive(self) -> int:
        """How many overflow threads are alive now (busy or waiting to retire)."""
        return len(self._overflow)

    @property
    def overflow_peak(self) -> int:
        """The most overflow threads ever alive at once (never more than ``overflow``)."""
        return self._overflow_peak

    def shutdown(self, wait: bool = False, timeout: float | None = None) -> None:
        """Stop every thread once its queued calls are done; with ``wait``, join them."""
        with self._lock:
            self._shutdown = True
            workers = [*self._workers, *self._overflow]
        for worker in workers:
            worker.queue.put(None)
        if wait:
            for worker in workers:
                if worker.thread is not threading.current_thread():
                    worker.thread.join(timeout)

    # -- internals; every method named _locked_* expects self._lock to be held.

    def _locked_bind_overflow(self, lease: Lease) -> bool:
        worker: _Worker | None = None
        if self._overflow_free:
            worker = self._overflow_free.pop()
        elif len(self._overflow) < self.overflow:
            self._overflow_created += 1
            worker = _Worker(self, f"{self.name}-overflow-{self._overflow_created}", True)
            self._overflow.add(worker)
            self._overflow_peak = max(self._overflow_peak, len(self._overflow))
            worker.thread.start()
        if worker is None:
            return False
        self._locked_attach(lease, worker)
        return True

    def _locked_bind(self, lease: Lease) -> None:
        worker: _Worker | None = None
        if lease._overflow and self._locked_bind_overflow(lease):
            return
        prev = lease._prev
        if prev is not None and prev in self._free:
            self._free.remove(prev)
            worker = prev
        elif self._free:
            worker = self._free.pop()
        elif len(self._workers) < self.size:
            worker = _Worker(self, f"{self.name}-{len(self._workers)}")
            self._workers.append(worker)
            worker.thread.start()
        elif self._idle_bound:
            worker, owner = self._idle_bound.popitem(last=False)
            owner._worker = None
            owner._prev = worker
            if owner._on_unbind is not None and owner._unbind_due:
                worker.queue.put((None, None, owner._on_unbind, (), {}))
        if worker is None:
            if lease not in self._waiting:
                self._waiting.append(lease)
            return
        self._locked_attach(lease, worker)

    def _locked_attach(self, lease: Lease, worker: _Worker) -> None:
        lease._worker = worker
        lease._prev = worker
        if lease._on_bind is not None:
            worker.queue.put((None, None, lease._on_bind, (), {}))
        pending, lease._pending = lease._pending, []
        for item in pending:
            worker.queue.put(item)
        lease._busy += len(pending)

    def _locked_unbind(self, lease: Lease) -> None:
        worker = lease._worker
        if worker is None:
            return
        lease._worker = None
        self._idle_bound.pop(worker, None)
        if lease._on_unbind is not None and lease._unbind_due:
            # Queued first, so it runs on this thread before the next lease's calls.
            worker.queue.put((None, None, lease._on_unbind, (), {}))
        if worker.overflow:
            # Overflow threads serve overflow leases only: pool waiters keep waiting for the
            # pool, whose size is what bounds plain sync work (and its database connections);
            # an overflow lease that fell back to waiting for the pool takes it, though.
            for waiter in self._waiting:
                if waiter._overflow and waiter._pending:
                    self._waiting.remove(waiter)
                    self._locked_attach(waiter, worker)
                    return
            self._overflow_free.append(worker)
            return
        while self._waiting:
            waiter = self._waiting.popleft()
            if waiter._pending:
                self._locked_attach(waiter, worker)
                return
        self._free.append(worker)

    def _locked_idle(self, lease: Lease, releasable: bool) -> None:
        worker = lease._worker
        if worker is None:  # pragma: no cover - a busy lease is always bound
            return
        if (
            lease._released
            or (worker.overflow and not lease._overflow)  # see Lease.leave_overflow
            or (releasable and self._waiting and not worker.overflow)
        ):
            self._locked_unbind(lease)
        elif releasable and not worker.overflow:
            self._idle_bound[worker] = lease
            self._idle_bound.move_to_end(worker)

    def _next_overflow_item(self, worker: _Worker) -> WorkItem | None:
        """The next item for an overflow thread; ``None`` once it should stop, either at
        shutdown or after ``overflow_idle`` seconds free."""
        while True:
            try:
                return worker.queue.get(timeout=self.overflow_idle)
            except queue.Empty:
                with self._lock:
                    # Only a free thread retires; one just handed a lease has work queued.
                    if worker in self._overflow_free and worker.queue.empty():
                        self._overflow_free.remove(worker)
                        self._overflow.discard(worker)
                        return None

    def _run_worker(self, worker: _Worker) -> None:
        worker.ident = threading.get_ident()
        _local.overflow = worker.overflow
        serve_from(worker.queue, self._run_item)
        get = worker.queue.get
        slot: list[WorkItem | None] = [None]
        while True:
            item = self._next_overflow_item(worker) if worker.overflow else get()
            if item is None:
                for hook in list(self._exit_hooks):
                    try:
                        hook()
                    except Exception:
                        logger.exception("Error in thread pool exit hook %r", hook)
                return
            slot[0] = item
            del item
            self._run_item(slot)

    def _run_item(self, slot: list[WorkItem | None]) -> None:
        # The item comes in a one-element list that this takes it out of, so that no caller
        # holds it: the call's arguments (the request) are dropped before the future is settled.
        # Else the loop, woken by the settling, could see this thread still holding the request
        # and find it held elsewhere (async_handler._cycles); an idle thread keeps nothing.
        item = slot[0]
        slot[0] = None
        if item is None:
            return
        lease, future, fn, args, kwargs = item
        del item
        if lease is None or future is None:  # a bind/unbind hook
            try:
                fn()
            except Exception:
                logger.exception("Error in thread pool hook %r", fn)
            return
        run = future.set_running_or_notify_cancel()
        result: Any = None
        error: BaseException | None = None
        if run:
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                error = exc
        del fn, args, kwargs
        keep, unbind_if = lease._keep, lease._unbind_if
        try:
            releasable = keep is None or not keep()
        except Exception:
            releasable = False
        if unbind_if is not None:
            try:
                lease._unbind_due = bool(unbind_if())
            except Exception:
                lease._unbind_due = True
        with self._lock:
            lease._busy -= 1
            if lease._busy == 0:
                self._locked_idle(lease, releasable)
        # Settle the future last: it wakes the waiting loop, which then needs the GIL this
        # thread would otherwise hold for its bookkeeping (on one core, two more switches).
        if run:
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)


class Lease(Executor):
    """One request's claim on one thread of a :class:`ThreadPool`.

    It is an :class:`concurrent.futures.Executor`, so ``loop.run_in_executor(lease, fn)`` and
    asgiref's ``ThreadSensitiveContext(executor=lease)`` both route calls through it.  Calls run
    one at a time, in submission order.  Call :meth:`release` when the request is over.
    """

    def __init__(
        self,
        pool: ThreadPool,
        keep: Callable[[], bool] | None = None,
        on_bind: _Hook | None = None,
        on_unbind: _Hook | None = None,
        overflow: bool = False,
        unbind_if: Callable[[], bool] | None = None,
    ) -> None:
        self._pool = pool
        self._overflow = overflow
        self._keep = keep
        self._on_bind = on_bind
        self._on_unbind = on_unbind
        self._unbind_if = unbind_if
        # Whether on_unbind has work when the thread is let go (unbind_if's last answer).
        self._unbind_due = True
        self._worker: _Worker | None = None
        self._prev: _Worker | None = None
        self._pending: list[WorkItem] = []
        self._busy = 0
        self._released = False

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        """Queue ``fn(*args, **kwargs)`` on this lease's thread; never blocks."""
        future: Future[_T] = Future()
        self._queue((self, future, fn, args, kwargs))
        return future

    def call(self, fn: Callable[..., _T], /, *args: Any) -> LoopCall[_T]:
        """Queue ``fn(*args)`` on this lease's thread, to be awaited on the running loop.

        The loop-side twin of :meth:`submit`, for hot paths: no ``concurrent.futures.Future``,
        no chaining; the thread settles :attr:`LoopCall.waiter` with one
        ``call_soon_threadsafe``.  Must be called on the loop's thread.
        """
        call: LoopCall[_T] = LoopCall(asyncio.get_running_loop())
        self._queue((self, call, fn, args, {}))
        return call

    def _queue(self, item: WorkItem) -> None:
        pool = self._pool
        with pool._lock:
            if self._released:
                raise RuntimeError("cannot submit to a released Lease")
            if pool._shutdown:
                raise RuntimeError("cannot submit to a ThreadPool after shutdown")
            if self._worker is None:
                self._pending.append(item)
                pool._locked_bind(self)
            else:
                pool._idle_bound.pop(self._worker, None)
                self._worker.queue.put(item)
                self._busy += 1

    async def run(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Await ``fn(*args, **kwargs)`` run on this lease's thread, copying the context.

        Cancelling drops the call if it has not started; a started call runs to its end on the
        thread, unawaited.
        """
        ctx = contextvars.copy_context()
        call = self.call(ctx.run, functools.partial(fn, *args, **kwargs))
        try:
            return await call.waiter
        except asyncio.CancelledError:
            call.cancel()
            raise

    @property
    def overflow(self) -> bool:
        """Whether the lease binds to an overflow thread; settable until it first binds."""
        return self._overflow

    @overflow.setter
    def overflow(self, value: bool) -> None:
        self._overflow = value

    def leave_overflow(self) -> None:
        """Give back an overflow thread: later calls bind to the pool, as a plain lease's do.

        For a request whose thread-blocking part is over but which lives on (a WebSocket after
        its handshake left the sync-only middleware): it must not hold a thread for its whole
        life.  The thread is let go now if idle, else when its current call returns.
        """
        pool = self._pool
        with pool._lock:
            self._overflow = False
            worker = self._worker
            if worker is not None and worker.overflow and self._busy == 0:
                pool._locked_unbind(self)

    @property
    def thread_ident(self) -> int | None:
        """The ident of the bound thread, or ``None`` while unbound."""
        worker = self._worker
        return worker.ident if worker is not None else None

    def release(self) -> None:
        """End the lease: its thread goes back to the pool once queued calls finish.

        Idempotent; later :meth:`submit` calls raise :class:`RuntimeError`.
        """
        pool = self._pool
        with pool._lock:
            if self._released:
                return
            self._released = True
            if self._worker is None:
                if self in pool._waiting:
                    pool._waiting.remove(self)
                for _, future, *_ in self._pending:
                    if future is not None:
                        future.cancel()
                self._pending = []
            elif self._busy == 0:
                pool._locked_unbind(self)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Executor API: the same as :meth:`release` (the pool's threads live on)."""
        self.release()
