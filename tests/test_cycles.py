"""A finished request is freed by reference counting, not left to the cyclic collector
(async_handler._cycles), and only when nothing else can reach it."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from functools import partial

import httpx
import pytest

from async_handler._cycles import ENABLED, release
from tests.handler_driver import make_environ, run_async
from tests.server import GunicornServer
from tests.test_hops import STOCK

pytestmark = pytest.mark.skipif(
    not ENABLED, reason="release() is off here: sys.getrefcount() is not exact on this Python"
)


#: Ids of requests whose __del__ ran.
FREED: list[int] = []


@pytest.fixture
def collector_off() -> Iterator[None]:
    # With the collector off, a request in a reference cycle is never freed: only reference
    # counting can free it.
    gc.collect()
    gc.disable()
    FREED.clear()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


@pytest.fixture
def request_class(django_project):
    from django.core.handlers.wsgi import WSGIRequest

    class Traced(WSGIRequest):
        def __del__(self) -> None:
            FREED.append(id(self))

    return Traced


def _request(request_class):
    """A request as startproject's middleware leave it: user, auser and messages set."""
    from django.contrib.auth.middleware import AuthenticationMiddleware
    from django.contrib.messages.middleware import MessageMiddleware
    from django.contrib.sessions.middleware import SessionMiddleware
    from django.http import HttpResponse

    request = request_class(make_environ("GET", "/sync/hello/"))
    for layer in (SessionMiddleware, AuthenticationMiddleware, MessageMiddleware):
        layer(lambda r: HttpResponse()).process_request(request)
    return request


def test_a_released_request_is_freed_by_reference_counting(collector_off, request_class):
    request = _request(request_class)
    assert not request.user.is_authenticated  # an evaluated lazy user releases as well
    ident = id(request)
    assert release(request, 1)
    assert not hasattr(request, "auser") and "_messages" not in vars(request)
    del request
    assert FREED == [ident]


def test_without_release_the_request_waits_for_the_collector(collector_off, request_class):
    request = _request(request_class)
    del request
    assert FREED == []  # the cycles hold it
    gc.collect()
    assert len(FREED) == 1


@pytest.mark.parametrize(
    "hold",
    [
        pytest.param(lambda request: [request], id="the request"),
        pytest.param(lambda request: request.user, id="its lazy user"),
        pytest.param(lambda request: request.auser, id="its auser"),
        pytest.param(lambda request: request._messages, id="its messages"),
        pytest.param(lambda request: request._messages.storages, id="its inner storages"),
        pytest.param(lambda request: request.user._setupfunc, id="the lazy user's function"),
        pytest.param(lambda request: request.user._setupfunc.__closure__, id="the closure"),
        pytest.param(lambda request: request.auser.args, id="auser's arguments"),
        pytest.param(lambda request: weakref.ref(request), id="a weak reference"),
        pytest.param(
            lambda request: setattr(request, "job", partial(print, request)), id="another cycle"
        ),
    ],
)
def test_anything_else_reaching_the_request_keeps_it_whole(collector_off, request_class, hold):
    request = _request(request_class)
    held = hold(request)  # noqa: F841 (held while release() looks)
    assert not release(request, 1)
    assert not request.user.is_authenticated
    assert request._messages.request is request
    assert request.auser.args == (request,)


def test_a_miscounted_caller_releases_nothing(collector_off, request_class):
    request = _request(request_class)
    alias = request  # noqa: F841 (a second reference the caller does not declare)
    assert not release(request, 1)
    assert release(request, 2)


def test_objects_without_django_back_references_are_left_alone(django_project, request_class):
    assert not release(object(), 1)
    bare = request_class(make_environ("GET", "/"))
    assert not release(bare, 1)
    assert vars(bare)


# -- through the handler, in process


@pytest.fixture
def traced_app(django_project, request_class):
    from django.test import override_settings

    from async_handler import AsyncDjangoApplication

    with override_settings(MIDDLEWARE=STOCK):
        app = AsyncDjangoApplication()
        app.request_class = request_class
        asyncio.run(run_async(app, make_environ("GET", "/sync/hello/")))  # lazy imports
        yield app


@pytest.mark.parametrize("path", ["/sync/hello/", "/async/hello/"])
def test_the_handler_frees_each_request_when_it_ends(collector_off, traced_app, path):
    FREED.clear()  # the fixture's warm-up request
    for _ in range(3):
        result = asyncio.run(run_async(traced_app, make_environ("GET", path)))
        assert result.status == "200 OK"
    assert len(FREED) == 3


def test_the_thread_lets_go_of_the_request_before_the_loop_resumes(collector_off, traced_app):
    # With a tiny switch interval the loop often takes the GIL the moment the pool thread
    # settles the call: the thread must not hold the request (the call's arguments) by then.
    import sys

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        FREED.clear()
        for _ in range(50):
            result = asyncio.run(run_async(traced_app, make_environ("GET", "/sync/hello/")))
            assert result.status == "200 OK"
    finally:
        sys.setswitchinterval(interval)
    assert len(FREED) == 50


def test_a_request_a_view_keeps_stays_whole(collector_off, traced_app):
    from tests.djproject.views import KEPT

    FREED.clear()
    result = asyncio.run(run_async(traced_app, make_environ("GET", "/sync/keep/")))
    assert result.status == "200 OK"
    kept = KEPT.pop()
    assert FREED == []
    assert not kept.user.is_authenticated
    assert kept._messages.request is kept


# -- through our worker


@pytest.fixture(scope="module")
def worker():
    # A generation-0 threshold no test reaches: only reference counting frees requests here.
    server = GunicornServer(
        "tests.djproject.wsgi:application",
        args=["--threads", "2"],
        env={"ASYNC_HANDLER_GC_THRESHOLD": "100000000"},
        ready_path="/async/hello/",
    )
    with server:
        yield server


def _live(client: httpx.Client) -> dict:
    return client.get("/observe/live-requests/").json()


@pytest.mark.parametrize("path", ["/sync/hello/", "/async/hello/", "/sync/echo/?a=1"])
def test_the_worker_holds_no_finished_request(worker, path):
    # The test project's stack: startproject's seven, with a sync-only middleware among them.
    with httpx.Client(base_url=worker.url, timeout=10) as client:
        before = _live(client)
        assert before["gc_enabled"]
        for _ in range(300):
            assert client.get(path).status_code == 200
        after = _live(client)
    assert after["live"] <= before["live"] + 5, (before, after)


def test_the_worker_keeps_a_request_a_view_holds(worker):
    with httpx.Client(base_url=worker.url, timeout=10) as client:
        before = _live(client)
        for _ in range(50):
            assert client.get("/sync/keep/").status_code == 200
        after = _live(client)
    assert after["kept"] == before["kept"] + 50
    assert after["live"] >= before["live"] + 50
