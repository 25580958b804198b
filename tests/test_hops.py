"""Thread hops per request: what the fused chain promises (issue: performance).

A hop is one call submitted to the request's leased thread.  Bind/unbind housekeeping is not a
hop: it rides along with the first and last call on a thread.
"""

from __future__ import annotations

import asyncio

import pytest

from async_handler._hop import _in_thread
from async_handler.threads import Lease
from tests.handler_driver import make_environ, run_async

STOCK = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]


@pytest.fixture
def count_hops(monkeypatch, django_project):
    hops: list[str] = []
    queue = Lease._queue  # every call of a lease, by submit() or call(), goes through here

    def counting(self, item):
        fn, args = item[2], item[3]
        if fn is _in_thread:  # run_sync's wrapper: name what it runs
            fn = args[4]
        hops.append(getattr(fn, "__qualname__", repr(fn)))
        return queue(self, item)

    monkeypatch.setattr(Lease, "_queue", counting)
    return hops


def _hops_for(middleware, path, hops, *counters):
    from django.test import override_settings

    from async_handler import AsyncDjangoApplication

    with override_settings(MIDDLEWARE=middleware):
        app = AsyncDjangoApplication()
        asyncio.run(run_async(app, make_environ("GET", path)))  # warm-up (lazy imports)
        for counter in (hops, *counters):
            counter.clear()
        result = asyncio.run(run_async(app, make_environ("GET", path)))
    assert result.status == "200 OK", result
    return list(hops)


def test_async_view_through_stock_middleware_takes_at_most_three_hops(count_hops):
    hops = _hops_for(STOCK, "/async/hello/", count_hops)
    assert len(hops) <= 3, hops


def test_sync_view_through_stock_middleware_takes_one_hop(count_hops):
    hops = _hops_for(STOCK, "/sync/hello/", count_hops)
    assert len(hops) == 1, hops


def test_async_capable_chain_takes_no_hop(count_hops):
    hops = _hops_for(
        ["tests.djproject.middleware.async_only_middleware"], "/async/hello/", count_hops
    )
    assert hops == []


def test_no_middleware_async_view_takes_no_hop(count_hops):
    assert _hops_for([], "/async/hello/", count_hops) == []


SYNC_HOOK = "tests.djproject.middleware.SyncHookMiddleware"


@pytest.mark.parametrize(
    ("path", "expected"), [("/sync/hello/", 1), ("/async/hello/", 2)], ids=["sync", "async"]
)
def test_mixin_declared_sync_only_costs_no_extra_hop(count_hops, path, expected):
    """A MiddlewareMixin with async_capable = False is fused like the others (issue 11).

    Django would build it as a sync layer, holding one thread across the inner chain and the
    view; here it adds no hop to the stock chain's count.
    """
    stock = _hops_for(STOCK, path, count_hops)
    with_layer = _hops_for([*STOCK, SYNC_HOOK], path, count_hops)
    assert len(stock) == expected, stock
    assert len(with_layer) == len(stock), with_layer


@pytest.mark.parametrize("path", ["/async/hello/", "/sync/hello/"])
def test_sync_only_middleware_takes_one_hop(count_hops, path):
    """Startproject's seven and a function-style middleware innermost: one hop.  Outside a
    sync-only layer the chain is sync, so Django runs the seven inline on the request's thread;
    for an async view that thread then blocks in async_to_sync (on an overflow thread) while
    the view runs on the loop, for a sync view it runs the view in place."""
    hops = _hops_for([*STOCK, "tests.djproject.middleware.function_middleware"], path, count_hops)
    assert len(hops) == 1, hops


@pytest.fixture
def count_wakeups(monkeypatch, django_project):
    """Calls of ``call_soon_threadsafe``: each is a thread waking the loop."""
    woken: list[str] = []
    wake = asyncio.BaseEventLoop.call_soon_threadsafe

    def counting(self, callback, *args, **kwargs):
        woken.append(getattr(callback, "__qualname__", repr(callback)))
        return wake(self, callback, *args, **kwargs)

    monkeypatch.setattr(asyncio.BaseEventLoop, "call_soon_threadsafe", counting)
    return woken


@pytest.mark.parametrize(("path", "wakeups"), [("/sync/hello/", 1), ("/async/hello/", 2)])
def test_sync_only_middleware_crosses_to_the_loop_once_per_async_part(
    count_hops, count_wakeups, path, wakeups
):
    """Behind a sync-only middleware the chain runs on the request's thread as under
    WSGIHandler: a sync view wakes the loop once, with the response; an async view once more,
    to start it there x."""
    mw = ["tests.djproject.middleware.function_middleware", *STOCK]
    assert len(_hops_for(mw, path, count_hops, count_wakeups)) == 1
    assert len(count_wakeups) == wakeups, count_wakeups
