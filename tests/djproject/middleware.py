"""Middleware of every kind, each able to short-circuit or raise on request.

A request names a layer in ``X-Short-Circuit`` or ``X-Raise-In`` to make it answer itself or
raise there; every sync hook records its thread in ``request.sync_threads``.
"""

import threading

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpResponse
from django.utils.deprecation import MiddlewareMixin


class LayerError(Exception):
    pass


def _act(request, layer):
    if request.headers.get("X-Raise-In") == layer:
        raise LayerError(f"raised in {layer}")
    if request.headers.get("X-Short-Circuit") == layer:
        return HttpResponse(f"short-circuit by {layer}", status=299, headers={"X-Layer": layer})
    return None


def _record(request, name):
    threads = getattr(request, "sync_threads", None)
    if threads is None:
        threads = request.sync_threads = []
    threads.append((name, threading.get_ident()))


def async_only_middleware(get_response):
    """A new-style async-only middleware (sync_capable = False)."""
    if not iscoroutinefunction(get_response):
        raise RuntimeError("async_only_middleware needs an async chain")

    async def middleware(request):
        request.loop_thread = threading.get_ident()
        response = _act(request, "async_mw")
        if response is None:
            response = await get_response(request)
        response["X-Async-MW"] = "1"
        if request.headers.get("X-Raise-In") == "async_mw_response":
            raise LayerError("raised in async_mw_response")
        return response

    middleware.sync_capable = False
    middleware.async_capable = True
    markcoroutinefunction(middleware)
    return middleware


async_only_middleware.sync_capable = False
async_only_middleware.async_capable = True


def sync_only_middleware(get_response):
    """A new-style sync-only middleware (async_capable = False)."""

    def middleware(request):
        _record(request, "sync_mw")
        response = _act(request, "sync_mw")
        if response is None:
            response = get_response(request)
        _record(request, "sync_mw_after")
        response["X-Sync-MW"] = "1"
        return response

    return middleware


sync_only_middleware.sync_capable = True
sync_only_middleware.async_capable = False


class HookMiddleware(MiddlewareMixin):
    """Old-style hooks: process_request/view/exception/template_response/response.

    ``layer`` prefixes the names it answers to in ``X-Raise-In``/``X-Short-Circuit`` and records
    in ``request.sync_threads``; ``header`` is the header its process_response sets.
    """

    layer = "hook"
    header = "X-Hook"

    def process_request(self, request):
        _record(request, f"{self.layer}_request")
        return _act(request, f"{self.layer}_request")

    def process_view(self, request, view_func, view_args, view_kwargs):
        _record(request, f"{self.layer}_view")
        return _act(request, f"{self.layer}_view")

    def process_exception(self, request, exception):
        _record(request, f"{self.layer}_exception")
        if request.headers.get("X-Handle-Exception") in ("1", self.layer):
            return HttpResponse(
                f"{self.layer} handled {type(exception).__name__}: {exception}", status=298
            )
        return None

    def process_template_response(self, request, response):
        _record(request, f"{self.layer}_template")
        if request.headers.get("X-Raise-In") == f"{self.layer}_template":
            raise LayerError(f"raised in {self.layer}_template")
        response.context_data = {**(response.context_data or {}), "extra": "template hook"}
        return response

    def process_response(self, request, response):
        _record(request, f"{self.layer}_response")
        if request.headers.get("X-Raise-In") == f"{self.layer}_response":
            raise LayerError(f"raised in {self.layer}_response")
        response[self.header] = "1"
        return response


class SyncHookMiddleware(HookMiddleware):
    """The same hooks, declared sync-only: Django adapts it as a sync layer (issue 11)."""

    layer = "synchook"
    header = "X-Sync-Hook"
    async_capable = False


def function_middleware(get_response):
    """The first middleware of Django's docs: a plain function, sync-only by default."""

    def middleware(request):
        _record(request, "function_mw")
        response = get_response(request)
        response["X-Function-MW"] = "1"
        return response

    return middleware


class SyncOnlyMixinMiddleware(MiddlewareMixin):
    """A hook-style middleware that declares itself sync-only (``async_capable = False``)."""

    async_capable = False

    def process_request(self, request):
        _record(request, "mixin_sync_request")

    def process_response(self, request, response):
        response["X-Mixin-Sync"] = "1"
        return response
