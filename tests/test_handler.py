"""AsyncDjangoApplication behaviour: threads, concurrency, signals, cleanup, fallback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from async_handler.contract import ASYNC_KEY
from tests.handler_driver import make_environ, run_async, run_wsgi


@pytest.fixture(scope="module")
def app(django_project):
    from async_handler import AsyncDjangoApplication

    return AsyncDjangoApplication()


@pytest.fixture(scope="module")
def async_chain_app(django_project):
    """An app whose middleware never holds a thread across the view (no sync-only layer)."""
    from django.test import override_settings

    from async_handler import AsyncDjangoApplication

    chain = [
        "tests.djproject.middleware.async_only_middleware",
        "tests.djproject.middleware.HookMiddleware",
    ]
    with override_settings(MIDDLEWARE=chain):
        return AsyncDjangoApplication()


@pytest.fixture
def signal_counts(django_project):
    from django.core import signals

    counts: Counter[str] = Counter()
    threads: list[int] = []

    def started(**kwargs):
        counts["started"] += 1

    def finished(**kwargs):
        counts["finished"] += 1
        threads.append(threading.get_ident())

    signals.request_started.connect(started)
    signals.request_finished.connect(finished)
    yield counts, threads
    signals.request_started.disconnect(started)
    signals.request_finished.disconnect(finished)


def test_is_a_wsgi_handler_with_a_coroutine_get_response(app):
    from django.core.handlers.wsgi import WSGIHandler

    assert isinstance(app, WSGIHandler)
    assert asyncio.iscoroutinefunction(app.get_response)
    assert app.async_handler_awaitable is True


def test_request_class_customisation_is_honoured(django_project):
    from django.core.handlers.wsgi import WSGIRequest

    from async_handler import AsyncDjangoApplication

    class TaggedRequest(WSGIRequest):
        pass

    seen: list[type] = []

    class App(AsyncDjangoApplication):
        request_class = TaggedRequest

        async def get_response(self, request):
            seen.append(type(request))
            return await super().get_response(request)

    result = asyncio.run(run_async(App(), make_environ("GET", "/async/hello/")))
    assert result.status == "200 OK"
    assert seen == [TaggedRequest]


def test_invalid_thread_setting_names_the_setting(django_project):
    from django.core.exceptions import ImproperlyConfigured
    from django.test import override_settings

    from async_handler import AsyncDjangoApplication

    with override_settings(ASYNC_HANDLER_THREADS=0):
        with pytest.raises(ImproperlyConfigured, match=r"ASYNC_HANDLER_THREADS.*got 0"):
            AsyncDjangoApplication()


def test_construction_sets_django_up():
    code = (
        "import os; os.environ['DJANGO_SETTINGS_MODULE'] = 'tests.djproject.settings';"
        "from async_handler import AsyncDjangoApplication;"
        "from django.apps import apps;"
        "app = AsyncDjangoApplication(); print(apps.ready)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "True"


def test_async_request_returns_an_awaitable_and_plain_call_an_iterable(app):
    environ = make_environ("GET", "/async/hello/")
    result = app(dict(environ, **{ASYNC_KEY: True}), lambda s, h, e=None: None)
    assert asyncio.iscoroutine(result)
    result.close()  # never awaited: the coroutine has not started, nothing to clean up
    fallback = run_wsgi(app, make_environ("GET", "/async/hello/"))
    assert fallback.body == b"Hello, async world"


def _sync_threads(result):
    import json

    data = json.loads(result.body)
    return data, {t for _, t in data["sync_threads"]}


@pytest.mark.parametrize("path", ["/sync/threads/", "/async/threads/"])
def test_sync_code_runs_off_the_loop_on_one_thread(app, path):
    async def main():
        return await run_async(app, make_environ("GET", path)), threading.get_ident()

    result, loop_thread = asyncio.run(main())
    data, threads = _sync_threads(result)
    assert data["loop"] == loop_thread
    names = [name for name, _ in data["sync_threads"]]
    assert "hook_request" in names and "hook_response" not in names  # response hook runs later
    assert len(threads) == 1, data
    assert loop_thread not in threads


def test_sync_code_affinity_under_concurrency(app):
    """200 concurrent requests on a 4-thread pool: each request's sync code stays on one thread."""

    async def main():
        return await asyncio.gather(
            *(run_async(app, make_environ("GET", "/async/threads/")) for _ in range(200))
        )

    results = asyncio.run(main())
    for result in results:
        data, threads = _sync_threads(result)
        assert len(threads) == 1, data
    assert app.thread_pool.threads_started <= app.thread_pool.size


@pytest.mark.parametrize("path", ["/sync/threads/", "/async/threads/"])
def test_sync_code_stays_on_one_thread_across_an_async_layer_inside_the_sync_chain(
    django_project, path
):
    """An async-only layer inside the sync-only one: the sync chain crosses to the loop for it
    and back for the layers inside it (sync_chain._OnLoop, _OnThread), and every piece of the
    request's sync code still runs on its one thread."""
    from django.conf import settings
    from django.test import override_settings

    from async_handler import AsyncDjangoApplication

    inner = "tests.djproject.middleware.async_only_middleware"
    rest = [m for m in settings.MIDDLEWARE if m != inner]
    at = rest.index("tests.djproject.middleware.sync_only_middleware") + 1
    with override_settings(MIDDLEWARE=[*rest[:at], inner, *rest[at:]]):
        app = AsyncDjangoApplication()

        async def main():
            requests = (run_async(app, make_environ("GET", path)) for _ in range(50))
            return await asyncio.gather(*requests)

        results = asyncio.run(main())
    for result in results:
        assert ("X-Async-MW", "1") in result.headers, result
        data, threads = _sync_threads(result)
        assert len(threads) == 1, data
        assert data["loop"] not in threads


def test_overflow_guess_resolves_each_path_once_per_urlconf(app, monkeypatch):
    from django.urls import URLResolver, clear_url_caches

    resolved: list[str] = []
    resolve = URLResolver.resolve

    def counting(self, path):
        if path.startswith("/"):  # the root resolver (included ones see the rest of the path)
            resolved.append(path)
        return resolve(self, path)

    monkeypatch.setattr(URLResolver, "resolve", counting)
    answers = [app._wants_overflow(path) for path in ("/async/hello/", "/sync/hello/", "/nope/")]
    assert answers == [True, False, False]
    again = [app._wants_overflow(path) for path in ("/async/hello/", "/sync/hello/")]
    assert again == [True, False]
    assert resolved == ["/async/hello/", "/sync/hello/", "/nope/"]
    clear_url_caches()  # a new resolver (override_settings(ROOT_URLCONF=...) does this)
    assert app._wants_overflow("/async/hello/") is True
    assert resolved[-1] == "/async/hello/" and len(resolved) == 4


def test_chain_build_names_the_thread_blocking_middleware(app, async_chain_app):
    assert app._thread_blocking_middleware == ("tests.djproject.middleware.sync_only_middleware",)
    assert async_chain_app._thread_blocking_middleware == ()


def test_sync_only_middleware_does_not_cap_async_views_at_the_pool(app):
    """300 async views awaiting 1 s through the project's sync-only middleware on a 4-thread
    pool finish together: each holds an overflow thread, not one of the pool's four."""
    from async_handler.threads import is_overflow_thread

    pool = app.thread_pool

    async def main():
        started = time.monotonic()
        results = await asyncio.gather(
            *(run_async(app, make_environ("GET", "/async/sleep/", "s=1")) for _ in range(300))
        )
        return results, time.monotonic() - started

    results, elapsed = asyncio.run(main())
    assert [r.status for r in results] == ["200 OK"] * 300
    assert elapsed < 4, f"300 concurrent 1 s async views took {elapsed:.2f} s"
    assert pool.threads_started <= pool.size
    assert 1 <= pool.overflow_peak <= 300
    assert not is_overflow_thread()


def test_thousand_concurrent_async_views_on_one_loop(django_project):
    """1,000 views each awaiting 1 s finish together: they share the loop, not the pool.

    The chain is async-capable (the async-only middleware): no request holds a thread.  With a
    sync-only middleware each request holds an overflow thread instead
    (test_sync_only_middleware_does_not_cap_async_views_at_the_pool).  Hook-style middleware
    costs a thread hop per hook; test_sync_code_affinity_under_concurrency covers it.
    """
    from django.test import override_settings

    from async_handler import AsyncDjangoApplication

    with override_settings(MIDDLEWARE=["tests.djproject.middleware.async_only_middleware"]):
        app = AsyncDjangoApplication()
    before = threading.active_count()

    async def main():
        return await asyncio.gather(
            *(
                run_async(app, make_environ("GET", "/async/sleep/", query="s=1"))
                for _ in range(1000)
            )
        )

    started = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - started
    assert all(r.status == "200 OK" and r.body == b"slept" for r in results)
    assert elapsed < 2.0, f"1,000 concurrent 1 s views took {elapsed:.2f} s"
    # No thread per request: at most the pool (4) and the loop's default executor appear.
    assert threading.active_count() - before <= app.thread_pool.size + 8


def test_signals_once_per_request_and_finished_off_the_loop(app, signal_counts):
    counts, threads = signal_counts

    async def main():
        await asyncio.gather(
            *(
                run_async(app, make_environ("GET", p))
                for p in ["/async/hello/", "/sync/hello/"] * 25
            )
        )
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert counts == {"started": 50, "finished": 50}
    assert loop_thread not in threads


def test_receivers_connected_after_warm_up_are_sent(app, django_project):
    # The handler remembers that only housekeeping listens; a receiver connected later (or a
    # disconnected one) must be seen on the very next request.
    from django.core import signals

    seen: list[str] = []

    def late(**kwargs):
        seen.append("late")

    asyncio.run(run_async(app, make_environ("GET", "/async/hello/")))
    signals.request_finished.connect(late)
    try:
        asyncio.run(run_async(app, make_environ("GET", "/async/hello/")))
        assert seen == ["late"]
    finally:
        signals.request_finished.disconnect(late)
    asyncio.run(run_async(app, make_environ("GET", "/async/hello/")))
    assert seen == ["late"]


def test_request_finished_closes_caches_whose_close_does_something(django_project):
    from django.test import override_settings

    from async_handler import AsyncDjangoApplication
    from tests.djproject.views import ClosingCache

    closing = {"default": {"BACKEND": "tests.djproject.views.ClosingCache"}}
    with override_settings(CACHES=closing):
        app = AsyncDjangoApplication()
        ClosingCache.closed = 0
        for _ in range(3):
            result = asyncio.run(run_async(app, make_environ("GET", "/async/cache/")))
            assert result.status == "200 OK", result
        assert ClosingCache.closed == 3
        # A request that opened no cache has nothing to close.
        asyncio.run(run_async(app, make_environ("GET", "/async/hello/")))
        assert ClosingCache.closed == 3


def test_cancelled_view_sees_cancellation_and_signals_still_fire(async_chain_app, signal_counts):
    from tests.djproject import views

    counts, _ = signal_counts
    views.EVENTS.clear()

    async def main():
        tasks = [
            asyncio.ensure_future(
                run_async(
                    async_chain_app, make_environ("GET", "/async/sleep/", query=f"s=5&tag={i}")
                )
            )
            for i in range(20)
        ]
        deadline = time.monotonic() + 5
        while len(views.EVENTS) < 20 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in tasks:
            task.cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    cancelled = sorted(e for e in views.EVENTS if e.startswith("cancelled"))
    assert cancelled == sorted(f"cancelled {i}" for i in range(20))
    assert counts == {"started": 20, "finished": 20}


def test_async_stream_is_not_buffered_under_plain_wsgi(app):
    from tests.djproject import views

    views.EVENTS.clear()
    start_calls: list[str] = []
    body = app(
        make_environ("GET", "/async/stream-probe/"), lambda s, h, e=None: start_calls.append(s)
    )
    iterator = iter(body)
    assert next(iterator) == b"chunk 0\n"
    assert views.EVENTS == ["produced 0"]
    assert next(iterator) == b"chunk 1\n"
    assert views.EVENTS == ["produced 0", "produced 1"]
    body.close()
    assert views.EVENTS[-1] == "generator closed"
    assert start_calls == ["200 OK"]


def test_async_stream_on_the_loop_is_closed_when_abandoned(app):
    from tests.djproject import views

    views.EVENTS.clear()

    async def main():
        environ = dict(make_environ("GET", "/async/stream-probe/"), **{ASYNC_KEY: True})
        body = await app(environ, lambda s, h, e=None: None)
        first = await body.__anext__()
        await body.aclose()
        return first

    assert asyncio.run(main()) == b"chunk 0\n"
    assert views.EVENTS == ["produced 0", "generator closed"]


def test_file_response_goes_to_the_servers_file_wrapper(app):
    from wsgiref.util import FileWrapper

    from tests.djproject.views import PAYLOAD

    async def main():
        environ = dict(make_environ("GET", "/file/"), **{ASYNC_KEY: True})
        body = await app(environ, lambda s, h, e=None: None)
        assert isinstance(body, FileWrapper)
        data = b"".join(body)
        assert not body.filelike.closed
        await body.aclose()
        assert body.filelike.closed
        return data

    assert asyncio.run(main()) == PAYLOAD.read_bytes()


def test_server_refusing_headers_still_cleans_up(app, signal_counts):
    counts, _ = signal_counts

    def refuse(status, headers, exc_info=None):
        raise ValueError("header refused by server")

    async def main():
        environ = dict(make_environ("GET", "/async/hello/"), **{ASYNC_KEY: True})
        await app(environ, refuse)

    with pytest.raises(ValueError, match="header refused"):
        asyncio.run(main())
    assert counts == {"started": 1, "finished": 1}


def test_servers_pool_is_used_when_lent(app):
    from async_handler.threads import ThreadPool

    pool = ThreadPool(1, name="lent")
    try:
        result = asyncio.run(run_async(app, make_environ("GET", "/sync/threads/"), pool=pool))
        _, threads = _sync_threads(result)
        assert pool.threads_started == 1
        assert threads == {pool._workers[0].ident}
    finally:
        pool.shutdown(wait=True, timeout=5)
