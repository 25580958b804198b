"""The async middleware chain, with the thread hops of hook-style middleware fused.

Layer: Django glue (Django, asgiref).

In an async chain Django runs every ``MiddlewareMixin`` hook through its own ``sync_to_async``
call: with startproject's seven middleware that is about a dozen thread hops per request, each
costing more than the hello-world view.  Here consecutive hook-style layers become one
:class:`FusedLayers`: their ``process_request`` hooks run in one hop, the inner chain is awaited
on the loop, and their ``process_response`` hooks run in one more hop.  Consecutive sync
``process_view`` hooks likewise run in one hop.  Everything else is built exactly as Django's
``BaseHandler.load_middleware(is_async=True)`` builds it.  A chain with a sync-only middleware
is built by :mod:`async_handler.sync_chain` instead, as Django's ``WSGIHandler`` builds it.

What a fused group keeps of Django's semantics, layer by layer (outermost first):

* a hook returning a response short-circuits: inner layers and the view are skipped, and the
  ``process_response`` hooks of that layer and of the layers outside it run;
* an exception in a layer's hook becomes that layer's response (``response_for_exception``, as
  ``convert_exception_to_response`` does around every layer), which the layers outside it then
  see in their ``process_response``; the raising layer's own ``process_response`` does not run;
* the order of hooks is Django's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.handlers.exception import convert_exception_to_response, response_for_exception
from django.http import HttpRequest, HttpResponseBase
from django.utils.deprecation import MiddlewareMixin
from django.utils.module_loading import import_string

from ._hop import run_sync
from .sync_chain import (
    ViewPart,
    _LoopView,
    build_sync_chain,
    capabilities,
    instantiate,
    is_fusable,
    is_sync_only,
)

if TYPE_CHECKING:
    from django.core.handlers.base import BaseHandler

__all__ = [
    "FusedLayers",
    "FusedViewHooks",
    "ViewPart",
    "WholeChain",
    "build_async_chain",
    "is_fusable",
    "is_sync_only",
]

logger = logging.getLogger("django.request")

_AsyncHandler = Callable[[HttpRequest], Awaitable[HttpResponseBase]]


class FusedLayers:
    """Consecutive hook-style middleware layers run as one async layer with two thread hops."""

    def __init__(self, layers: list[MiddlewareMixin], inner: _AsyncHandler) -> None:
        #: Outermost first, as in settings.MIDDLEWARE.
        self.layers = layers
        self.inner = inner
        self._requests = [getattr(m, "process_request", None) for m in layers]
        self._responses = [getattr(m, "process_response", None) for m in layers]
        self._any_request = any(self._requests)
        markcoroutinefunction(self)

    def __repr__(self) -> str:
        names = ", ".join(type(m).__qualname__ for m in self.layers)
        return f"<FusedLayers {names}>"

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        """Run the group's hooks around ``inner`` with at most two hops."""
        last = len(self.layers) - 1
        response: HttpResponseBase | None = None
        if self._any_request:
            index, response, raised = await run_sync(self._run_requests, request)
            if response is not None:
                # A short-circuit keeps its own layer's process_response; a raise does not.
                last = index - 1 if raised else index
        if response is None:
            response = await self.inner(request)
        if any(self._responses[: last + 1]):
            response = await run_sync(self._run_responses, request, response, last)
        return response

    def _run_requests(self, request: HttpRequest) -> tuple[int, HttpResponseBase | None, bool]:
        for index, hook in enumerate(self._requests):
            if hook is None:
                continue
            try:
                response = hook(request)
            except Exception as exc:
                return index, response_for_exception(request, exc), True
            if response:
                return index, response, False
        return -1, None, False

    def _run_responses(
        self, request: HttpRequest, response: HttpResponseBase, last: int
    ) -> HttpResponseBase:
        for index in range(last, -1, -1):
            hook = self._responses[index]
            if hook is None:
                continue
            try:
                response = hook(request, response)
            except Exception as exc:
                response = response_for_exception(request, exc)
        return response


class FusedViewHooks:
    """Consecutive sync ``process_view`` hooks in one hop; the first response wins, as in
    Django's ``_get_response_async`` loop."""

    def __init__(self, hooks: list[Callable[..., Any]]) -> None:
        self.hooks = hooks

    async def __call__(
        self, request: HttpRequest, callback: Any, args: Any, kwargs: Any
    ) -> HttpResponseBase | None:
        return await run_sync(self._run, request, callback, args, kwargs)

    def _run(self, request: HttpRequest, callback: Any, args: Any, kwargs: Any) -> Any:
        response = None
        for hook in self.hooks:
            response = hook(request, callback, args, kwargs)
            if response:
                break
        return response


class WholeChain:
    """The entire chain when every middleware is hook-style with sync hooks.

    One thread hop runs all ``process_request`` hooks, URL resolution and the ``process_view``
    hooks, and, for a sync view, the view, the template-response hooks, rendering and all
    ``process_response`` hooks too: a sync view costs exactly one hop.  An async view is
    awaited on the loop between that hop and one more for the ``process_response`` hooks.

    The view part is a :class:`ViewPart`, and an exception anywhere in it becomes a response as
    ``convert_exception_to_response`` makes it around ``_get_response_async``.
    """

    def __init__(
        self,
        handler: BaseHandler,
        group: FusedLayers,
        view_hooks: list[Callable[..., Any]],
        template_hooks: list[Callable[..., Any]],
    ) -> None:
        self.handler = handler
        self.group = group
        self.view = ViewPart(handler, view_hooks, template_hooks, loop_views=False)
        self._last = len(group.layers) - 1
        self._any_response = any(group._responses)
        markcoroutinefunction(self)

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        """Serve ``request`` through the whole chain in one or two hops."""
        done, value = await run_sync(self._front, request)
        if done:
            return value
        callback, wrapped, args, kwargs = value
        try:
            response = await self._await_view(request, callback, wrapped, args, kwargs)
        except Exception as exc:
            response = await run_sync(response_for_exception, request, exc)
        if self._any_response:
            response = await run_sync(self.group._run_responses, request, response, self._last)
        return response

    def _front(self, request: HttpRequest) -> tuple[bool, Any]:
        group = self.group
        index, response, raised = (
            group._run_requests(request) if group._any_request else (-1, None, False)
        )
        if response is not None:
            return True, group._run_responses(request, response, index - 1 if raised else index)
        try:
            response = self.view(request)
        except _LoopView as pending:
            return False, pending.args
        except Exception as exc:
            response = response_for_exception(request, exc)
        return True, group._run_responses(request, response, self._last)

    async def _await_view(
        self, request: HttpRequest, callback: Any, wrapped: Any, args: Any, kwargs: Any
    ) -> HttpResponseBase:
        handler = self.handler
        try:
            response = await wrapped(request, *args, **kwargs)
        except Exception as exc:
            response = await run_sync(handler.process_exception_by_middleware, exc, request)
            if response is None:
                raise
        handler.check_response(response, callback)
        if hasattr(response, "render") and callable(response.render):
            response = await run_sync(self.view.render, request, response)
        if asyncio.iscoroutine(response):
            raise RuntimeError("Response is still a coroutine.")
        return response


def _fuse_view_hooks(
    handler: BaseHandler, hooks: list[Callable[..., Any]]
) -> list[Callable[..., Any]]:
    fused: list[Callable[..., Any]] = []
    run: list[Callable[..., Any]] = []
    for hook in [*hooks, None]:
        if hook is not None and not iscoroutinefunction(hook):
            run.append(hook)
            continue
        if len(run) == 1:
            fused.append(handler.adapt_method_mode(True, run[0]))
        elif run:
            fused.append(FusedViewHooks(run))
        run = []
        if hook is not None:
            fused.append(hook)
    return fused


def build_async_chain(handler: BaseHandler) -> None:
    """Populate ``handler``'s middleware chain and hook lists for async requests.

    Without a :func:`is_sync_only` middleware: the same walk as Django's
    ``BaseHandler.load_middleware(is_async=True)`` over settings.MIDDLEWARE, with runs of
    :func:`is_fusable` layers wrapped in :class:`FusedLayers` (or the whole chain in
    :class:`WholeChain`).  With one: the walk of ``load_middleware(is_async=False)``, as
    Django's ``WSGIHandler`` builds it, entered in one hop (see :func:`_build_sync_chain`).

    It also sets ``handler._thread_blocking_middleware``: the paths (outermost first) of the
    sync-only middleware in the chain, for which a request holds its thread throughout.
    """
    if any(is_sync_only(import_string(path)) for path in settings.MIDDLEWARE):
        if build_sync_chain(handler):
            return
    view_hooks: list[Callable[..., Any]] = []
    template_hooks: list[Callable[..., Any]] = []
    raw_template_hooks: list[Callable[..., Any]] = []
    exception_hooks: list[Callable[..., Any]] = []
    all_fused = True
    handler_fn: Any = convert_exception_to_response(
        handler._get_response_async  # type: ignore[attr-defined]
    )
    pending: list[MiddlewareMixin] = []  # innermost first

    def collect(instance: Any) -> None:
        if hasattr(instance, "process_view"):
            view_hooks.insert(0, instance.process_view)
        if hasattr(instance, "process_template_response"):
            hook = instance.process_template_response
            raw_template_hooks.append(hook)
            template_hooks.append(handler.adapt_method_mode(True, hook))
        if hasattr(instance, "process_exception"):
            # Django keeps the exception stack synchronous (BaseHandler.load_middleware).
            exception_hooks.append(handler.adapt_method_mode(False, instance.process_exception))

    def flush() -> FusedLayers | None:
        nonlocal handler_fn, pending
        group = None
        if pending:
            group = FusedLayers(pending[::-1], handler_fn)
            handler_fn = convert_exception_to_response(group)
            pending = []
        return group

    for path in reversed(settings.MIDDLEWARE):
        middleware = import_string(path)
        capabilities(middleware, path)
        if is_fusable(middleware):
            # The mixin only keeps get_response for its own __call__, which a fused group never
            # uses; give it the group's inner handler.  A layer declaring async_capable = False
            # is fused too, and the chain stays async past it: Django would have put the inner
            # chain behind async_to_sync here and built every outer layer in sync mode.
            instance = instantiate(middleware, path, handler_fn)
            if instance is not None:
                pending.append(instance)
                collect(instance)
            continue
        flush()
        all_fused = False
        # Not sync-only and not fusable: async-capable, so it takes the async inner chain.
        instance = instantiate(middleware, path, handler_fn)
        if instance is None:
            continue
        collect(instance)
        handler_fn = convert_exception_to_response(instance)
    group = flush()
    hooks = [*view_hooks, *raw_template_hooks]
    if all_fused and group is not None and not any(map(iscoroutinefunction, hooks)):
        handler_fn = convert_exception_to_response(
            WholeChain(handler, group, view_hooks, raw_template_hooks)
        )
    handler._view_middleware = _fuse_view_hooks(handler, view_hooks)  # type: ignore[attr-defined]
    handler._template_response_middleware = template_hooks  # type: ignore[attr-defined]
    handler._exception_middleware = exception_hooks  # type: ignore[attr-defined]
    handler._thread_blocking_middleware = ()  # type: ignore[attr-defined]
    # Assigned last: Django treats a set _middleware_chain as "initialisation complete".
    handler._middleware_chain = handler_fn  # type: ignore[attr-defined]
