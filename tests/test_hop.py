"""run_sync: the fused chain's thread hop behaves as asgiref's thread-sensitive sync_to_async."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import sys
import threading

import pytest
from asgiref.local import Local
from asgiref.sync import async_to_sync, sync_to_async

from async_handler._hop import route_to, run_sync
from async_handler.threads import ThreadPool

var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
local = Local()


@pytest.fixture
def pool():
    pool = ThreadPool(2, name="hop")
    yield pool
    pool.shutdown(wait=True, timeout=5)


def in_request(pool, body):
    """Run ``body()`` as a request does: inside the handler's executor context for a lease."""
    async def main():
        lease = pool.lease()
        try:
            with route_to(lease):
                return await body(lease)
        finally:
            lease.release()

    return asyncio.run(main())


def test_runs_on_the_thread_sync_to_async_picks(pool, django_project):
    async def body(lease):
        ours = await run_sync(threading.get_ident)
        theirs = await sync_to_async(threading.get_ident)()
        return ours, theirs, lease.thread_ident

    ours, theirs, leased = in_request(pool, body)
    assert ours == theirs == leased != threading.get_ident()


def test_context_changes_come_back_to_the_caller(pool, django_project):
    def change() -> str:
        seen = var.get()
        var.set("set in the thread")
        local.value = "local from the thread"  # as translation.activate() does
        return seen

    async def body(lease):
        var.set("set on the loop")
        seen = await run_sync(change)
        return seen, var.get(), getattr(local, "value", None)

    seen, after, local_value = in_request(pool, body)
    assert seen == "set on the loop"
    assert after == "set in the thread"
    assert local_value == "local from the thread"


def test_exc_info_in_the_thread_is_the_callers_exception(pool, django_project):
    async def body(lease):
        try:
            raise KeyError("being handled")
        except KeyError:
            return await run_sync(sys.exc_info)

    kind, value, _ = in_request(pool, body)
    assert kind is KeyError and value.args == ("being handled",)


def test_async_to_sync_inside_runs_on_the_callers_loop_and_comes_back(pool, django_project):
    async def inner() -> tuple[asyncio.AbstractEventLoop, int]:
        return asyncio.get_running_loop(), await sync_to_async(threading.get_ident)()

    def outer() -> tuple[asyncio.AbstractEventLoop, int, int]:
        loop, nested = async_to_sync(inner)()
        return loop, nested, threading.get_ident()

    async def body(lease):
        loop, nested, thread = await run_sync(outer)
        return loop is asyncio.get_running_loop(), nested, thread

    same_loop, nested, thread = in_request(pool, body)
    assert same_loop
    assert nested == thread  # a nested sync_to_async returns to the blocked request thread


def test_cancel_waits_for_a_running_call_then_propagates(pool, django_project):
    started, gate = threading.Event(), threading.Event()
    events: list[str] = []

    def slow() -> None:
        started.set()
        gate.wait(5)
        events.append("sync code finished")

    async def body(lease):
        hop = asyncio.ensure_future(run_sync(slow))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        hop.cancel()
        await asyncio.sleep(0.05)
        assert not hop.done(), "the hop returned while its sync code still ran"
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await hop
        events.append("cancel seen")

    in_request(pool, body)
    assert events == ["sync code finished", "cancel seen"]


def test_cancel_before_start_drops_the_call(pool, django_project):
    gate = threading.Event()
    ran: list[str] = []

    async def body(lease):
        lease.submit(gate.wait, 5)  # the request's thread is busy
        hop = asyncio.ensure_future(run_sync(ran.append, "never"))
        await asyncio.sleep(0.05)
        hop.cancel()
        # Dropped without waiting: the hop ends while the request's thread is still busy.
        await asyncio.wait({hop}, timeout=5)
        assert hop.cancelled()
        gate.set()
        await run_sync(ran.append, "after")

    in_request(pool, body)
    assert ran == ["after"]


def test_outside_a_request_it_is_sync_to_async(django_project):
    async def main() -> int:
        return await run_sync(threading.get_ident)

    assert asyncio.run(main()) != threading.get_ident()


def test_route_to_wins_over_an_inherited_async_to_sync_thread(pool, django_project):
    # A coroutine run by async_to_sync inherits the blocked thread as its executor; inside
    # route_to the lease must win (as with asgiref's ThreadSensitiveContext(executor=...)).
    async def body() -> tuple[int, int | None, int]:
        lease = pool.lease()
        try:
            with route_to(lease):
                inside = await sync_to_async(threading.get_ident)()
                leased = lease.thread_ident
            after = await sync_to_async(threading.get_ident)()
            return inside, leased, after
        finally:
            lease.release()

    def sync_caller() -> tuple[int, tuple[int, int | None, int]]:
        return threading.get_ident(), async_to_sync(body)()

    # On a thread of its own: asgiref < 3.13 writes Local state in place, and a value left in
    # the main thread's context would leak into every later test's tasks.
    with concurrent.futures.ThreadPoolExecutor(1) as one_thread:
        caller, (inside, leased, after) = one_thread.submit(sync_caller).result(30)
    assert inside == leased != caller
    assert after == caller  # the inherited executor is back after the block


def test_current_thread_executor_reads_what_asgiref_sees() -> None:
    # The fast read of AsyncToSync.executors.current must agree with the Local itself: unset
    # here, set inside a coroutine that async_to_sync runs, and unset again afterwards.
    from asgiref.sync import AsyncToSync

    from async_handler._hop import _current_thread_executor

    def both() -> tuple[object, object]:
        return _current_thread_executor(), getattr(AsyncToSync.executors, "current", None)

    async def inside() -> tuple[object, object]:
        return both()

    def sync_caller() -> tuple[tuple[object, object], ...]:
        return both(), async_to_sync(inside)(), both()

    with concurrent.futures.ThreadPoolExecutor(1) as one_thread:
        before, during, after = one_thread.submit(sync_caller).result(30)
    assert before == after == (None, None)
    fast, real = during
    assert fast is real and real is not None
