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

from async_handler._hop import route_to, run_on_loop, run_sync
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


def test_locals_stay_visible_both_ways_across_hops(pool, django_project):
    # The hand-back leaves a Local's storage in place when the hop did not change it: what the
    # loop set stays visible there and on the thread, hop after hop, and a change made on the
    # thread still replaces it.
    other = Local()

    def read() -> tuple[object, object]:
        return getattr(local, "value", None), getattr(other, "value", None)

    def change() -> None:
        other.value = "from the thread"

    async def body(lease):
        local.value = "from the loop"
        other.value = "before"
        seen = [await run_sync(read), await run_sync(read)]
        loop_view = [(local.value, other.value)]
        await run_sync(change)
        seen.append(await run_sync(read))
        loop_view.append((local.value, other.value))
        return seen, loop_view

    seen, loop_view = in_request(pool, body)
    assert seen == [
        ("from the loop", "before"),
        ("from the loop", "before"),
        ("from the loop", "from the thread"),
    ]
    assert loop_view == [("from the loop", "before"), ("from the loop", "from the thread")]


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


# -- run_on_loop: asgiref's async_to_sync from the request's thread, served from its own queue


def test_run_on_loop_awaits_on_the_callers_loop_and_serves_nested_calls_here(pool, django_project):
    async def inner(tag: str) -> tuple[asyncio.AbstractEventLoop, int, int, str]:
        ours = await run_sync(threading.get_ident)
        theirs = await sync_to_async(threading.get_ident)()
        return asyncio.get_running_loop(), ours, theirs, tag

    def outer() -> tuple[bool, int, int, int, str]:
        loop, ours, theirs, tag = run_on_loop(inner, tag="kw")
        return loop is main_loop[0], ours, theirs, threading.get_ident(), tag

    main_loop: list[asyncio.AbstractEventLoop] = []

    async def body(lease):
        main_loop.append(asyncio.get_running_loop())
        return await run_sync(outer)

    same_loop, ours, theirs, thread, tag = in_request(pool, body)
    assert same_loop and tag == "kw"
    assert ours == theirs == thread  # both kinds of nested hop come back to the blocked thread


def test_run_on_loop_copies_context_both_ways_and_keeps_exc_info(pool, django_project):
    async def inner() -> tuple[str, str]:
        seen = var.get()
        var.set("set on the loop")
        return seen, repr(sys.exc_info()[1])

    def outer() -> tuple[str, str, str]:
        var.set("set in the thread")
        try:
            raise KeyError("handled")
        except KeyError:
            seen, handling = run_on_loop(inner)
        return seen, handling, var.get()

    async def body(lease):
        return await run_sync(outer)

    seen, handling, after = in_request(pool, body)
    assert seen == "set in the thread"
    assert handling == repr(KeyError("handled"))
    assert after == "set on the loop"


def test_run_on_loop_raises_the_coroutines_exception(pool, django_project):
    async def inner() -> None:
        await asyncio.sleep(0)
        raise LookupError("from the loop")

    def outer() -> str:
        try:
            run_on_loop(inner)
        except LookupError as exc:
            return str(exc)
        return "nothing raised"

    async def body(lease):
        return await run_sync(outer)

    assert in_request(pool, body) == "from the loop"


def test_cancelling_the_request_cancels_the_coroutine_under_run_on_loop(pool, django_project):
    events: list[str] = []
    awaiting = threading.Event()

    async def inner() -> None:
        awaiting.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            events.append("coroutine cancelled")
            raise

    def outer() -> None:
        try:
            run_on_loop(inner)
        except asyncio.CancelledError:
            events.append("thread saw CancelledError")
            raise

    async def body(lease):
        hop = asyncio.ensure_future(run_sync(outer))
        await asyncio.get_running_loop().run_in_executor(None, awaiting.wait, 5)
        hop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(hop, 5)
        events.append("request cancelled")

    in_request(pool, body)
    assert events == ["coroutine cancelled", "thread saw CancelledError", "request cancelled"]


def test_run_on_loop_off_a_pool_thread_is_async_to_sync(django_project):
    async def inner() -> int:
        return threading.get_ident()

    async def main() -> tuple[int, int]:
        # sync_to_async's own thread (no pool): asgiref's async_to_sync does the work.
        return await sync_to_async(lambda: (run_on_loop(inner), threading.get_ident()))()

    on_loop, thread = asyncio.run(main())
    assert on_loop != thread


def test_shutdown_while_waiting_on_the_loop_stops_the_thread_afterwards(django_project):
    pool = ThreadPool(1, name="hop-stop")

    async def inner(released: asyncio.Event) -> str:
        pool.shutdown()  # queues the stop sentinel while this request's thread waits
        await released.wait()
        return "finished"

    async def body(lease):
        released = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, released.set)
        result = await run_sync(lambda: run_on_loop(inner, released))
        worker = pool._workers[0].thread
        await asyncio.get_running_loop().run_in_executor(None, worker.join, 5)
        return result, worker.is_alive()

    assert in_request(pool, body) == ("finished", False)


def test_nested_run_on_loop_waits_end_on_their_own_wake_up(pool, django_project):
    """A served call waits on the loop in turn while the outer coroutine finishes first (an
    async middleware that stops awaiting its inner chain): neither wait may lose its wake-up."""
    inner_started = threading.Event()

    async def innermost() -> str:
        inner_started.set()
        await asyncio.sleep(0.1)
        return "inner"

    def nested() -> str:
        return run_on_loop(innermost)

    async def outer_coroutine() -> str:
        # Starts a nested wait on the blocked thread, then finishes without waiting for it.
        pending = asyncio.ensure_future(run_sync(nested))
        await asyncio.get_running_loop().run_in_executor(None, inner_started.wait, 5)
        outer_coroutine.pending = pending  # type: ignore[attr-defined]
        return "outer"

    async def body(lease):
        result = await asyncio.wait_for(run_sync(lambda: run_on_loop(outer_coroutine)), 5)
        return result, await asyncio.wait_for(outer_coroutine.pending, 5)  # type: ignore[attr-defined]

    assert in_request(pool, body) == ("outer", "inner")
