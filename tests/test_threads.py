"""ThreadPool / Lease: lazy binding, affinity, hand-over of idle threads, FIFO waiting."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from async_handler.threads import CallerThreadExecutor, ThreadPool, is_overflow_thread

pytestmark = pytest.mark.server


def ident() -> int:
    return threading.get_ident()


@pytest.fixture
def pool():
    pool = ThreadPool(2, name="t")
    yield pool
    pool.shutdown(wait=True, timeout=5)


def test_size_must_be_positive():
    with pytest.raises(ValueError, match="at least 1, got 0"):
        ThreadPool(0)


def test_lease_binds_lazily_and_keeps_its_thread(pool):
    lease = pool.lease()
    assert lease.thread_ident is None
    assert pool.threads_started == 0
    first = lease.submit(ident).result(5)
    assert first != threading.get_ident()
    assert all(lease.submit(ident).result(5) == first for _ in range(20))
    assert pool.threads_started == 1
    lease.release()


def test_threads_never_exceed_size_and_are_reused(pool):
    idents = set()
    for _ in range(50):
        lease = pool.lease()
        idents.add(lease.submit(ident).result(5))
        lease.release()
    assert pool.threads_started <= 2
    assert len(idents) <= 2


def test_calls_run_in_submission_order(pool):
    lease = pool.lease()
    seen: list[int] = []
    futures = [lease.submit(seen.append, i) for i in range(200)]
    for f in futures:
        f.result(5)
    assert seen == list(range(200))
    lease.release()


def test_idle_thread_is_handed_over_when_all_are_bound(pool):
    a, b, c = pool.lease(), pool.lease(), pool.lease()
    ta = a.submit(ident).result(5)
    tb = b.submit(ident).result(5)
    assert ta != tb
    # Both threads are bound but idle: c takes the older one instead of waiting.
    tc = c.submit(ident).result(5)
    assert tc == ta
    assert a.thread_ident is None
    # a re-binds on its next call; the only idle thread now is b's.
    assert a.submit(ident).result(5) in {ta, tb}
    for lease in (a, b, c):
        lease.release()


def test_keep_predicate_pins_the_thread(pool):
    holding = pool.lease(keep=lambda: True)
    t_holding = holding.submit(ident).result(5)
    other = pool.lease()
    other.submit(ident).result(5)
    newcomer = pool.lease()
    t_new = newcomer.submit(ident).result(5)
    assert t_new != t_holding
    assert holding.thread_ident == t_holding
    for lease in (holding, other, newcomer):
        lease.release()


def test_busy_thread_is_never_shared_waiters_are_fifo(pool):
    gate = threading.Event()
    a, b = pool.lease(), pool.lease()
    fa = a.submit(gate.wait, 5)
    fb = b.submit(gate.wait, 5)
    order: list[str] = []
    c, d = pool.lease(), pool.lease()
    fc = c.submit(order.append, "c")
    fd = d.submit(order.append, "d")
    time.sleep(0.05)
    assert not fc.done() and not fd.done()
    gate.set()
    for f in (fa, fb, fc, fd):
        f.result(5)
    assert order in (["c", "d"], ["d", "c"])  # each got one of the two freed threads
    a.release()
    b.release()
    c.release()
    d.release()


def test_release_cancels_unstarted_work_and_refuses_more(pool):
    gate = threading.Event()
    a, b = pool.lease(keep=lambda: True), pool.lease(keep=lambda: True)
    a.submit(gate.wait, 5)
    b.submit(gate.wait, 5)
    waiting = pool.lease()
    queued = waiting.submit(ident)
    waiting.release()
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="released Lease"):
        waiting.submit(ident)
    gate.set()
    a.release()
    b.release()


def test_exceptions_propagate(pool):
    lease = pool.lease()

    def fail():
        raise KeyError("nope")

    with pytest.raises(KeyError):
        lease.submit(fail).result(5)
    assert lease.submit(lambda: 3).result(5) == 3
    lease.release()


def test_run_from_a_loop_copies_context(pool):
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var")

    async def main() -> tuple[str, int]:
        var.set("from the loop")
        lease = pool.lease()
        try:
            return await lease.run(lambda: (var.get(), ident()))
        finally:
            lease.release()

    value, thread = asyncio.run(main())
    assert value == "from the loop"
    assert thread != threading.get_ident()


def test_loop_call_delivers_results_and_exceptions_on_the_loop(pool):
    async def main() -> None:
        lease = pool.lease()
        try:
            call = lease.call(lambda a, b: (a + b, ident()), 2, 3)
            value, thread = await call.waiter
            assert value == 5 and thread != threading.get_ident()
            assert call.finished
            with pytest.raises(KeyError, match="nope"):
                await lease.call(lambda: {}["nope"]).waiter
        finally:
            lease.release()

    asyncio.run(main())


def test_loop_call_cancelled_before_it_starts_never_runs(pool):
    gate = threading.Event()
    ran: list[str] = []

    async def main() -> None:
        lease = pool.lease()
        try:
            lease.submit(gate.wait, 5)  # occupies the lease's thread
            call = lease.call(ran.append, "late")
            assert call.cancel() is True
            assert call.cancel() is False  # decided once
            gate.set()
            with pytest.raises(asyncio.CancelledError):
                await call.waiter
            await lease.call(ran.append, "next").waiter
        finally:
            lease.release()

    asyncio.run(main())
    assert ran == ["next"]


def test_loop_call_wait_outlasts_cancellation_of_the_waiter(pool):
    started, gate = threading.Event(), threading.Event()
    done: list[bool] = []

    def slow() -> None:
        started.set()
        gate.wait(5)
        done.append(True)

    async def main() -> None:
        lease = pool.lease()
        try:
            call = lease.call(slow)
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
            assert call.cancel() is False  # already running: cannot be dropped
            waiter = asyncio.ensure_future(call.wait())
            await asyncio.sleep(0.05)
            waiter.cancel()  # swallowed: sync code cannot be interrupted
            await asyncio.sleep(0.05)
            assert not waiter.done()
            gate.set()
            await asyncio.wait_for(waiter, 5)
            assert done == [True] and call.finished
        finally:
            lease.release()

    asyncio.run(main())


def test_release_cancels_an_unstarted_loop_call(pool):
    gate = threading.Event()

    async def main() -> None:
        a, b = pool.lease(keep=lambda: True), pool.lease(keep=lambda: True)
        a.submit(gate.wait, 5)
        b.submit(gate.wait, 5)
        waiting = pool.lease()
        call = waiting.call(ident)  # no thread free: queued on the unbound lease
        waiting.release()
        with pytest.raises(asyncio.CancelledError):
            await call.waiter
        gate.set()
        a.release()
        b.release()

    asyncio.run(main())


def test_one_shot_run(pool):
    assert pool.run(lambda x: x * 2, 21).result(5) == 42


def test_submit_after_shutdown_is_refused():
    pool = ThreadPool(1)
    pool.shutdown(wait=True)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.lease().submit(ident)


def test_caller_thread_executor_runs_work_on_the_waiting_thread():
    executor = CallerThreadExecutor()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:

        async def work() -> int:
            return await loop.run_in_executor(executor, ident)

        future = asyncio.run_coroutine_threadsafe(work(), loop)
        assert executor.run_until(future) == threading.get_ident()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


# -- overflow threads (issue 11): a lease whose thread blocks for the whole request


def test_overflow_leases_get_threads_beyond_the_pool():
    pool = ThreadPool(1, name="o", overflow=20)
    try:
        gate = threading.Event()
        leases = [pool.lease(overflow=True) for _ in range(20)]
        # Every lease blocks its thread: with the pool alone only one would run.
        futures = [lease.submit(gate.wait, 5) for lease in leases]
        idents = [lease.submit(ident) for lease in leases]
        assert all(lease.thread_ident is not None for lease in leases)
        gate.set()
        assert all(f.result(5) for f in futures)
        assert len({f.result(5) for f in idents}) == 20
        assert pool.threads_started == 0
        assert pool.overflow_started == pool.overflow_peak == 20
        assert pool.lease(overflow=False).submit(is_overflow_thread).result(5) is False
        for lease in leases:
            lease.release()
    finally:
        pool.shutdown(wait=True, timeout=5)


def test_overflow_lease_keeps_one_thread_and_marks_it():
    pool = ThreadPool(1, name="o", overflow=2)
    try:
        lease = pool.lease(overflow=True)
        # A pool lease waiting for nothing must not take the idle overflow thread.
        first = lease.submit(ident).result(5)
        other = pool.lease()
        other.submit(ident).result(5)
        assert lease.thread_ident == first
        assert all(lease.submit(ident).result(5) == first for _ in range(10))
        assert lease.submit(is_overflow_thread).result(5) is True
        assert other.submit(is_overflow_thread).result(5) is False
        other.release()
        lease.release()
    finally:
        pool.shutdown(wait=True, timeout=5)


def test_overflow_threads_are_reused_not_created_per_lease():
    pool = ThreadPool(1, name="o", overflow=50)
    try:
        for _ in range(5):
            gate = threading.Event()
            leases = [pool.lease(overflow=True) for _ in range(10)]
            futures = [lease.submit(gate.wait, 5) for lease in leases]
            gate.set()
            for lease, future in zip(leases, futures, strict=True):
                future.result(5)
                lease.release()
            time.sleep(0.05)  # the releases settle on their threads
        assert pool.overflow_started == pool.overflow_peak <= 10
    finally:
        pool.shutdown(wait=True, timeout=5)


def test_overflow_bound_falls_back_to_the_pool():
    pool = ThreadPool(1, name="o", overflow=2)
    try:
        gate = threading.Event()
        leases = [pool.lease(overflow=True) for _ in range(4)]
        futures = [lease.submit(gate.wait, 5) for lease in leases]
        assert pool.overflow_alive == 2
        assert pool.threads_started == 1  # the third runs on the pool thread
        assert leases[3].thread_ident is None  # the fourth waits
        gate.set()
        assert all(f.result(5) for f in futures)
        for lease in leases:
            lease.release()
        assert pool.overflow_peak == 2
    finally:
        pool.shutdown(wait=True, timeout=5)


def test_waiting_overflow_lease_takes_a_freed_overflow_thread():
    pool = ThreadPool(1, name="o", overflow=1)
    try:
        gate = threading.Event()
        a = pool.lease(overflow=True)
        b = pool.lease()
        c = pool.lease(overflow=True)
        fa = a.submit(gate.wait, 5)
        fb = b.submit(gate.wait, 5)
        fc = c.submit(ident)
        assert c.thread_ident is None
        gate.set()
        fa.result(5)
        a.release()
        fb.result(5)
        assert fc.result(5) in {a._prev.ident, b._prev.ident}  # type: ignore[union-attr]
        b.release()
        c.release()
    finally:
        pool.shutdown(wait=True, timeout=5)


def test_idle_overflow_threads_retire():
    pool = ThreadPool(1, name="o", overflow=5, overflow_idle=0.2)
    try:
        leases = [pool.lease(overflow=True) for _ in range(3)]
        gate = threading.Event()
        futures = [lease.submit(gate.wait, 5) for lease in leases]
        threads = [lease._worker.thread for lease in leases]  # type: ignore[union-attr]
        gate.set()
        for lease, future in zip(leases, futures, strict=True):
            future.result(5)
            lease.release()
        assert pool.overflow_alive == 3
        for thread in threads:
            thread.join(5)
            assert not thread.is_alive()
        assert pool.overflow_alive == 0
        # A later overflow lease starts a fresh thread.
        lease = pool.lease(overflow=True)
        assert lease.submit(is_overflow_thread).result(5) is True
        assert pool.overflow_started == 4
        lease.release()
    finally:
        pool.shutdown(wait=True, timeout=5)


def test_retiring_and_shutdown_run_exit_hooks_on_overflow_threads():
    pool = ThreadPool(1, name="o", overflow=2, overflow_idle=0.1)
    ran: list[bool] = []
    pool.add_exit_hook(lambda: ran.append(is_overflow_thread()))
    lease = pool.lease(overflow=True)
    thread_future = lease.submit(threading.current_thread)
    thread = thread_future.result(5)
    lease.release()
    thread.join(5)
    assert ran == [True]
    lease = pool.lease(overflow=True)
    thread = lease.submit(threading.current_thread).result(5)
    pool.shutdown(wait=True, timeout=5)
    assert not thread.is_alive()
    assert ran == [True, True]


def test_overflow_parameters_are_checked():
    with pytest.raises(ValueError, match="overflow must not be negative"):
        ThreadPool(1, overflow=-1)
    with pytest.raises(ValueError, match="overflow_idle must be positive"):
        ThreadPool(1, overflow=1, overflow_idle=0)


def _hooked_lease(pool, events, unbind_if=None):
    return pool.lease(
        on_bind=lambda: events.append(("bind", ident())),
        on_unbind=lambda: events.append(("unbind", ident())),
        unbind_if=unbind_if,
    )


def _settled(pool):
    # A one-shot call queued behind the hooks: once it ran, they have.
    lease = pool.lease()
    lease.submit(int).result(5)
    lease.release()


def test_bind_and_unbind_hooks_run_on_the_leased_thread(pool):
    events: list[tuple[str, int]] = []
    lease = _hooked_lease(pool, events)
    thread = lease.submit(ident).result(5)
    lease.release()
    _settled(pool)
    assert events == [("bind", thread), ("unbind", thread)]


@pytest.mark.parametrize(
    ("answers", "unbinds"), [([False], 0), ([True], 1), ([True, False], 0), ([False, True], 1)]
)
def test_unbind_hook_is_skipped_when_unbind_if_last_said_it_has_nothing_to_do(
    pool, answers, unbinds
):
    events: list[tuple[str, int]] = []
    pending = list(answers)
    lease = _hooked_lease(pool, events, unbind_if=lambda: pending.pop(0))
    for _ in answers:
        lease.submit(ident).result(5)
    lease.release()
    _settled(pool)
    assert [name for name, _ in events].count("unbind") == unbinds


def test_unbind_if_also_decides_for_a_handed_over_thread():
    pool = ThreadPool(1, name="t-hand")
    try:
        events: list[tuple[str, int]] = []
        idle = _hooked_lease(pool, events, unbind_if=lambda: False)
        thread = idle.submit(ident).result(5)  # bound, now idle and releasable
        other = pool.lease()
        assert other.submit(ident).result(5) == thread  # the only thread, handed over
        assert idle.thread_ident is None
        assert [name for name, _ in events] == ["bind"]  # handed over without the no-op hook
        other.release()
        idle.release()
    finally:
        pool.shutdown(wait=True, timeout=5)
