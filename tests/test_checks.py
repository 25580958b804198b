"""System check async_handler.W002: sync-only middleware named at start-up (issue 11)."""

from __future__ import annotations

from typing import Any

import pytest
from django.utils.decorators import sync_and_async_middleware
from django.utils.deprecation import MiddlewareMixin

from async_handler.apps import check_sync_only_middleware

HERE = __name__


def function_middleware(get_response: Any) -> Any:
    """The first example in Django's middleware docs: sync-only by default."""

    def middleware(request: Any) -> Any:
        return get_response(request)

    return middleware


class OwnCallMiddleware:
    """A class declaring async_capable = False with a __call__ of its own."""

    async_capable = False
    sync_capable = True

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        return self.get_response(request)


class DeclaredSyncMixin(MiddlewareMixin):
    """Hook-style; fused by our chain whatever async_capable says, so no warning."""

    async_capable = False

    def process_request(self, request: Any) -> None:
        return None


@sync_and_async_middleware
def both_middleware(get_response: Any) -> Any:
    return get_response


class FakeWhiteNoise(OwnCallMiddleware):
    pass


FakeWhiteNoise.__module__ = "whitenoise.middleware"


def _w002(middleware: list[str]) -> list[Any]:
    from django.test import override_settings

    with override_settings(MIDDLEWARE=middleware):
        return [m for m in check_sync_only_middleware() if m.id == "async_handler.W002"]


@pytest.mark.parametrize("name", ["function_middleware", "OwnCallMiddleware"])
def test_sync_only_middleware_warns(django_project, name):
    path = f"{HERE}.{name}"
    (warning,) = _w002([path])
    assert path in warning.msg
    assert "thread per in-flight request" in warning.msg
    assert "sync_and_async_middleware" in warning.hint
    assert "ServeStatic" not in warning.hint


@pytest.mark.parametrize(
    "path",
    [
        f"{HERE}.DeclaredSyncMixin",
        f"{HERE}.both_middleware",
        "django.middleware.common.CommonMiddleware",
        "tests.djproject.middleware.async_only_middleware",
        "no.such.module.Middleware",  # Django reports it when the chain loads
    ],
)
def test_async_capable_or_fusable_middleware_does_not_warn(django_project, path):
    assert _w002([path]) == []


def test_each_sync_only_middleware_is_named(django_project):
    middleware = [
        "django.middleware.security.SecurityMiddleware",
        f"{HERE}.function_middleware",
        f"{HERE}.DeclaredSyncMixin",
        "tests.djproject.middleware.sync_only_middleware",
        f"{HERE}.OwnCallMiddleware",
    ]
    named = [next(p for p in middleware if p in w.msg) for w in _w002(middleware)]
    assert named == [
        f"{HERE}.function_middleware",
        "tests.djproject.middleware.sync_only_middleware",
        f"{HERE}.OwnCallMiddleware",
    ]


def test_whitenoise_hint_names_servestatic(django_project):
    (warning,) = _w002([f"{HERE}.FakeWhiteNoise"])
    assert "servestatic.middleware.ServeStaticMiddleware" in warning.hint


def test_ready_registers_the_check(django_project):
    from django.core import checks

    import async_handler
    from async_handler.apps import AsyncHandlerConfig, check_app_order

    registry = checks.registry.registry
    before = set(registry.registered_checks)
    try:
        AsyncHandlerConfig("async_handler", async_handler).ready()
        assert check_sync_only_middleware in registry.get_checks()
    finally:
        # The test project does not install the app; leave the global registry as it was.
        registry.registered_checks = before
    assert check_app_order not in registry.get_checks() or check_app_order in before


@pytest.mark.parametrize(
    ("env", "layers", "warns"),
    [
        ({}, {}, False),
        ({"ASYNC_HANDLER_WORKERS": "1", "WEB_CONCURRENCY": "4"}, {}, False),
        ({"ASYNC_HANDLER_WORKERS": "4"}, {}, True),
        ({"WEB_CONCURRENCY": "3"}, {}, True),
        ({"WEB_CONCURRENCY": "3"}, {"default": {"BACKEND": "x"}}, False),
        ({"WEB_CONCURRENCY": "many"}, {}, False),
    ],
)
def test_w003_in_memory_groups_with_several_workers(
    django_project, monkeypatch, env, layers, warns
):
    from django.test import override_settings

    from async_handler.apps import check_in_memory_groups

    monkeypatch.delenv("ASYNC_HANDLER_WORKERS", raising=False)
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with override_settings(CHANNEL_LAYERS=layers):
        found = check_in_memory_groups()
    assert [w.id for w in found] == (["async_handler.W003"] if warns else [])


@pytest.mark.parametrize("nested_websocket", [False, True])
def test_w003_only_for_a_urlconf_with_websocket_views(
    django_project, monkeypatch, nested_websocket
):
    import types

    from django.test import override_settings
    from django.urls import include, path

    from async_handler.apps import check_in_memory_groups
    from tests.djproject import views

    inner = types.ModuleType("inner_urls")
    inner.urlpatterns = [path("hello/", views.async_hello)]
    if nested_websocket:
        inner.urlpatterns.append(path("ws/", views.ws_echo))
    root = types.ModuleType("root_urls")
    root.urlpatterns = [path("plain/", views.sync_hello), path("app/", include(inner))]
    monkeypatch.setenv("ASYNC_HANDLER_WORKERS", "2")
    with override_settings(CHANNEL_LAYERS={}, ROOT_URLCONF=root):
        found = check_in_memory_groups()
    assert [w.id for w in found] == (["async_handler.W003"] if nested_websocket else [])
