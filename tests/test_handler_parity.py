"""Differential parity: every response through AsyncDjangoApplication equals Django's own.

Each case runs through Django's ``WSGIHandler`` and through ``AsyncDjangoApplication`` twice: on
an event loop as our worker drives it (contract marker set) and as a plain WSGI server drives it
(the sync fallback).  Status, headers (apart from Date, Server and framing) and body must match.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.handler_driver import make_environ, run_async, run_wsgi

BOUNDARY = "----parityboundary"


def _multipart() -> bytes:
    return (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="title"\r\n\r\n'
        "holiday\r\n"
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="upload"; filename="a.txt"\r\n'
        "Content-Type: text/plain\r\n\r\n"
        "file contents \xe9\r\n"
        f"--{BOUNDARY}--\r\n"
    ).encode("latin-1")


def case(id_: str, method: str, path: str, **kwargs: Any) -> Any:
    return pytest.param(method, path, kwargs, id=id_)


FORM = urlencode({"a": "1", "b": ["x", "y"]}, doseq=True).encode()
BIG_FORM = urlencode({"big": "x" * 10_000}).encode()
JSON_BODY = json.dumps({"answer": 42, "list": [1, 2]}).encode()
MULTIPART_CT = f"multipart/form-data; boundary={BOUNDARY}"

CASES = [
    case("sync-hello", "GET", "/sync/hello/"),
    case("async-hello", "GET", "/async/hello/"),
    case("sync-head", "HEAD", "/sync/hello/"),
    case("async-head", "HEAD", "/async/hello/"),
    case("sync-query", "GET", "/sync/echo/", query="a=1&a=2&b=%C3%A9"),
    case("async-query", "GET", "/async/echo/", query="a=1&a=2&b=%C3%A9"),
    case(
        "sync-urlencoded",
        "POST",
        "/sync/echo/",
        body=FORM,
        content_type="application/x-www-form-urlencoded",
    ),
    case(
        "async-urlencoded",
        "POST",
        "/async/echo/",
        body=FORM,
        content_type="application/x-www-form-urlencoded",
    ),
    case("sync-multipart", "POST", "/sync/echo/", body=_multipart(), content_type=MULTIPART_CT),
    case("async-multipart", "POST", "/async/echo/", body=_multipart(), content_type=MULTIPART_CT),
    case("sync-json", "POST", "/sync/echo/", body=JSON_BODY, content_type="application/json"),
    case("async-json", "POST", "/async/echo/", body=JSON_BODY, content_type="application/json"),
    case("async-json-put", "PUT", "/async/echo/", body=JSON_BODY, content_type="application/json"),
    case("sync-empty-post", "POST", "/sync/echo/"),
    case("async-empty-post", "POST", "/async/echo/"),
    case("sync-cookies-in", "GET", "/sync/echo/", headers={"Cookie": "a=1; b=two"}),
    case("async-cookies-in", "GET", "/async/echo/", headers={"Cookie": "a=1; b=two"}),
    case("sync-cookies-out", "GET", "/sync/cookie/"),
    case("sync-template", "GET", "/sync/template/"),
    case("async-template", "GET", "/async/template/"),
    case(
        "template-hook-raises", "GET", "/async/template/", headers={"X-Raise-In": "hook_template"}
    ),
    case("sync-stream", "GET", "/sync/stream/"),
    case("async-stream", "GET", "/async/stream/"),
    case("file", "GET", "/file/"),
    case("file-head", "HEAD", "/file/"),
    case("not-found", "GET", "/nope/"),
    case("append-slash", "GET", "/sync/hello"),
    case("disallowed-host", "GET", "/async/hello/", headers={"Host": "evil.example"}),
    case(
        "sync-data-too-big",
        "POST",
        "/sync/echo/",
        body=BIG_FORM,
        content_type="application/x-www-form-urlencoded",
    ),
    case(
        "async-data-too-big",
        "POST",
        "/async/echo/",
        body=BIG_FORM,
        content_type="application/x-www-form-urlencoded",
    ),
    case(
        "csrf-failure",
        "POST",
        "/csrf/",
        body=FORM,
        content_type="application/x-www-form-urlencoded",
    ),
    case("csrf-get-ok", "GET", "/csrf/"),
    case("cbv-get", "GET", "/async/cbv/", query="q=hi"),
    case(
        "cbv-post",
        "POST",
        "/async/cbv/",
        body=FORM,
        content_type="application/x-www-form-urlencoded",
    ),
    case("cbv-not-allowed", "DELETE", "/async/cbv/"),
    case("sync-none", "GET", "/sync/none/"),
    case("async-none", "GET", "/async/none/"),
    *(
        case(f"{mode}-raise-{kind}", "GET", f"/{mode}/raise/{kind}/")
        for mode in ("sync", "async")
        for kind in ("http404", "permission", "suspicious", "error", "none")
    ),
    *(
        case(f"raise-in-{layer}-{mode}", "GET", f"/{mode}/hello/", headers={"X-Raise-In": layer})
        for layer in (
            "async_mw",
            "async_mw_response",
            "sync_mw",
            "hook_request",
            "hook_view",
            "hook_response",
        )
        for mode in ("sync", "async")
    ),
    *(
        case(
            f"short-circuit-{layer}-{mode}",
            "GET",
            f"/{mode}/hello/",
            headers={"X-Short-Circuit": layer},
        )
        for layer in ("async_mw", "sync_mw", "hook_request", "hook_view")
        for mode in ("sync", "async")
    ),
    case(
        "process-exception-sync", "GET", "/sync/raise/error/", headers={"X-Handle-Exception": "1"}
    ),
    case(
        "process-exception-async", "GET", "/async/raise/error/", headers={"X-Handle-Exception": "1"}
    ),
    case(
        "process-exception-404", "GET", "/async/raise/http404/", headers={"X-Handle-Exception": "1"}
    ),
    # Through a MiddlewareMixin declaring async_capable = False (present in the *-sync-hook
    # chains), which Django builds as a sync layer and we fuse with the hook-style layers.
    *(
        case(f"raise-in-{layer}-{mode}", "GET", f"/{mode}/hello/", headers={"X-Raise-In": layer})
        for layer in ("synchook_request", "synchook_view", "synchook_response")
        for mode in ("sync", "async")
    ),
    *(
        case(
            f"short-circuit-{layer}-{mode}",
            "GET",
            f"/{mode}/hello/",
            headers={"X-Short-Circuit": layer},
        )
        for layer in ("synchook_request", "synchook_view")
        for mode in ("sync", "async")
    ),
    *(
        case(
            f"process-exception-synchook-{mode}",
            "GET",
            f"/{mode}/raise/error/",
            headers={"X-Handle-Exception": "synchook"},
        )
        for mode in ("sync", "async")
    ),
    case(
        "process-exception-synchook-404",
        "GET",
        "/async/raise/http404/",
        headers={"X-Handle-Exception": "synchook"},
    ),
    case(
        "synchook-template-raises",
        "GET",
        "/async/template/",
        headers={"X-Raise-In": "synchook_template"},
    ),
]


def _without_new_style(mw: list[str]) -> list[str]:
    return [m for m in mw if not m.endswith(("async_only_middleware", "sync_only_middleware"))]


def _with_sync_hook(mw: list[str]) -> list[str]:
    hook = mw.index("tests.djproject.middleware.HookMiddleware")
    return [*mw[:hook], "tests.djproject.middleware.SyncHookMiddleware", *mw[hook:]]


def _async_inside_sync(mw: list[str]) -> list[str]:
    inner = "tests.djproject.middleware.async_only_middleware"
    rest = [m for m in mw if m != inner]
    sync_only = rest.index("tests.djproject.middleware.sync_only_middleware")
    return [*rest[: sync_only + 1], inner, *rest[sync_only + 1 :]]


# "mixed" is the test project's chain: async-only, stock, sync-only and hook-style layers, so
# hook runs are fused between unfusable layers.  "fused" leaves out the two new-style layers, so
# the whole chain is hook-style and takes the one-hop path (async_handler.chain.WholeChain).
# The "-sync-hook" variants add a MiddlewareMixin with async_capable = False next to the
# HookMiddleware: Django builds it as a sync layer (the inner chain behind async_to_sync), we
# fuse it, so in "fused-sync-hook" the whole chain is still WholeChain.
# "mixed-async-inside" moves the async-only layer inside the sync-only one, so the sync chain
# crosses to the loop and back in the middle (async_handler.sync_chain._OnLoop / _OnThread).
CHAINS = {
    "mixed": None,
    "mixed-async-inside": _async_inside_sync,
    "fused": _without_new_style,
    "mixed-sync-hook": _with_sync_hook,
    "fused-sync-hook": lambda mw: _with_sync_hook(_without_new_style(mw)),
}


@pytest.fixture(scope="module", params=sorted(CHAINS))
def handlers(request, django_project):
    from django.conf import settings
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import override_settings

    from async_handler import AsyncDjangoApplication
    from async_handler.chain import WholeChain

    select = CHAINS[request.param]
    middleware = select(settings.MIDDLEWARE) if select else settings.MIDDLEWARE
    with override_settings(MIDDLEWARE=middleware):
        django_handler, ours = WSGIHandler(), AsyncDjangoApplication()
        uses_whole_chain = isinstance(
            getattr(ours._middleware_chain, "__wrapped__", None), WholeChain
        )
        assert uses_whole_chain == request.param.startswith("fused")
        yield django_handler, ours


def test_enough_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize(("method", "path", "kwargs"), CASES)
def test_parity(handlers, method, path, kwargs):
    django_handler, ours = handlers
    with warnings.catch_warnings():
        # Django's WSGIHandler buffers an async stream and warns; ours streams it (asserted in
        # test_handler.py), and the bytes must be the same.
        warnings.filterwarnings("ignore", "StreamingHttpResponse must consume asynchronous")
        expected = run_wsgi(django_handler, make_environ(method, path, **kwargs)).comparable()
    on_loop = asyncio.run(run_async(ours, make_environ(method, path, **kwargs))).comparable()
    fallback = run_wsgi(ours, make_environ(method, path, **kwargs)).comparable()
    assert on_loop == expected
    assert fallback == expected


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("/async/raise/error/", "boom"),
        ("/sync/raise/error/", "boom"),
        ("/async/raise/http404/", "no such thing"),
        ("/nowhere/", "nowhere"),
    ],
)
def test_debug_technical_pages(handlers, path, needle):
    """DEBUG pages carry tracebacks that differ frame by frame; compare what a reader sees."""
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import override_settings

    from async_handler import AsyncDjangoApplication

    with override_settings(DEBUG=True):
        django_handler, ours = WSGIHandler(), AsyncDjangoApplication()
        expected = run_wsgi(django_handler, make_environ("GET", path))
        on_loop = asyncio.run(run_async(ours, make_environ("GET", path)))
        fallback = run_wsgi(ours, make_environ("GET", path))
    assert needle.encode() in expected.body
    for result in (on_loop, fallback):
        assert result.status == expected.status
        assert dict(result.headers)["Content-Type"] == dict(expected.headers)["Content-Type"]
        assert needle.encode() in result.body
