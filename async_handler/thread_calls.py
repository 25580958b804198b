"""Calls that cross between a thread and the event loop, for :mod:`async_handler.threads`.

:class:`LoopCall` is one call queued on a pool thread whose result is settled on the loop (the
pool's cheap alternative to a ``concurrent.futures.Future`` plus ``wrap_future``);
:class:`CallerThreadExecutor` runs calls on the one thread that blocks waiting for a result, as
asgiref's ``AsyncToSync`` does.  Stdlib only, like the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, Generic, TypeVar

__all__ = ["CallerThreadExecutor", "LoopCall", "WorkItem", "serve_from", "serve_until_woken"]

_T = TypeVar("_T")

#: What a pool thread's queue holds: (lease or None, the call's future, fn, args, kwargs).
WorkItem = tuple[
    Any,
    "Future[Any] | LoopCall[Any] | None",
    Callable[..., Any],
    tuple[Any, ...],
    dict[str, Any],
]


class LoopCall(Generic[_T]):
    """One call queued by :meth:`Lease.call`: its thread settles :attr:`waiter` on the loop.

    On the thread's side it offers the three methods of ``concurrent.futures.Future`` the pool
    uses.  Whether the call starts is decided once, atomically (a ``list.pop`` under the GIL),
    between the thread starting it and :meth:`cancel`.
    """

    __slots__ = ("_claim", "_done", "finished", "loop", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: Resolves to the call's result or exception.
        self.waiter: asyncio.Future[_T] = loop.create_future()
        #: Set on the loop once the thread is through with the call.
        self.finished = False
        self._done: asyncio.Future[None] | None = None
        self._claim = [True]

    def cancel(self) -> bool:
        """Make sure the call never starts; ``False`` if it already has.  Thread-safe."""
        try:
            self._claim.pop()
        except IndexError:
            return False
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(self._settle, None, None, True)
        return True

    async def wait(self) -> None:
        """Wait until a started call (:meth:`cancel` returned ``False``) has finished on its
        thread, ignoring cancellation: sync code cannot be interrupted."""
        if self.finished:
            return
        done = self._done
        if done is None:
            done = self._done = self.loop.create_future()
        while not done.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(done)

    # -- the pool thread's side

    def set_running_or_notify_cancel(self) -> bool:
        try:
            self._claim.pop()
        except IndexError:
            return False
        return True

    def set_result(self, result: _T) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._settle, result, None, False)

    def set_exception(self, error: BaseException) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._settle, None, error, False)

    def _settle(self, result: Any, error: BaseException | None, cancelled: bool) -> None:
        self.finished = True
        waiter = self.waiter
        if not waiter.done():
            if cancelled:
                waiter.cancel()
            elif error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(result)
        if self._done is not None and not self._done.done():
            self._done.set_result(None)


class CallerThreadExecutor(Executor):
    """Runs submitted calls on the one thread that blocks in :meth:`run_until`.

    A plain WSGI server thread uses it to run the request's sync code itself while the
    request's coroutine runs on a background loop, as asgiref's ``AsyncToSync`` does.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[WorkItem | None] = queue.SimpleQueue()
        self._thread = threading.current_thread()

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        """Queue a call for the owning thread; never blocks."""
        future: Future[_T] = Future()
        self._queue.put((None, future, fn, args, kwargs))
        return future

    def run_until(self, future: Future[_T]) -> _T:
        """Run queued calls on the calling thread until ``future`` is done; return its result."""
        if threading.current_thread() is not self._thread:
            raise RuntimeError("CallerThreadExecutor.run_until must run on its owner thread")
        future.add_done_callback(lambda _: self._queue.put(None))
        while not future.done():
            item = self._queue.get()
            if item is None:
                continue
            _, work, fn, args, kwargs = item
            if work is not None and work.set_running_or_notify_cancel():
                try:
                    work.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    work.set_exception(exc)
        return future.result()


_local = threading.local()


def serve_from(
    work: queue.SimpleQueue[WorkItem | None],
    run_item: Callable[[list[WorkItem | None]], None],
) -> None:
    """Declare the calling thread a pool thread: ``run_item`` runs each item of ``work``,
    taking it out of the one-element list it is given (so the caller no longer holds it)."""
    _local.served = (work, run_item)


def _noop() -> None:
    pass


#: Put on a thread's queue to wake a :func:`serve_until_woken` there.  Hook-shaped, so that a
#: stale one (its wait ended on the flag first) runs as a no-op wherever it is taken.
_WAKE: WorkItem = (None, None, _noop, (), {})


def serve_until_woken(start: Callable[[Callable[[], None]], object]) -> bool:
    """Block the calling pool thread, still serving its queue, until woken.

    For a call running on a pool thread that must wait for the loop (the sync half of an
    ``async_to_sync``): ``start(wake)`` is called once; until ``wake()`` is called, from any
    thread, this thread runs the calls queued to it, which are the calls the same request makes
    meanwhile (its lease stays bound here while this call is busy).  That replaces asgiref's
    ``CurrentThreadExecutor`` and its second queue: one wake-up to get here and one per call.
    Waits may nest (a call served here waits in turn); each ends on its own flag, whichever
    wait takes the wake-up.

    Returns ``False``, without calling ``start``, when the calling thread is no pool thread.
    """
    served = getattr(_local, "served", None)
    if served is None:
        return False
    work, run_item = served
    woken: list[bool] = []

    def wake() -> None:
        woken.append(True)
        work.put(_WAKE)

    start(wake)
    stopping = False
    slot: list[WorkItem | None] = [None]
    while not woken:
        item = work.get()
        if item is _WAKE:
            continue
        if item is None:  # shutdown: finish this call first, then stop as asked
            stopping = True
            continue
        slot[0] = item
        del item
        run_item(slot)
    if stopping:
        work.put(None)
    return True
