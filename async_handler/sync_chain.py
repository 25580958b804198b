"""The middleware chain of a stack with a sync-only middleware, and what kind a middleware is.

Layer: Django glue (Django, asgiref).

A sync-only middleware (:func:`is_sync_only`) calls the rest of its chain synchronously, so its
thread blocks while that rest runs, an ``async def`` view's await included.  Django's async
build would still make every hook inside it a hop of its own, each a round trip through the
loop; :func:`build_sync_chain` instead builds the chain as Django's ``WSGIHandler`` does,
entered in one hop, and crosses to the loop only for what is async.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, MiddlewareNotUsed
from django.core.handlers.exception import convert_exception_to_response
from django.http import HttpRequest, HttpResponseBase
from django.urls import get_resolver
from django.utils.deprecation import MiddlewareMixin
from django.utils.module_loading import import_string

from ._hop import run_on_loop, run_sync

if TYPE_CHECKING:
    from django.core.handlers.base import BaseHandler

__all__ = [
    "AsyncViewGuess",
    "ViewPart",
    "build_sync_chain",
    "instantiate",
    "is_fusable",
    "is_sync_only",
]

logger = logging.getLogger("django.request")


def is_fusable(middleware: Any) -> bool:
    """Whether ``middleware`` is a plain hook-style class whose hooks may share a hop.

    That is a ``MiddlewareMixin`` subclass that keeps the mixin's ``__call__``/``__acall__``
    (so all it does is call its hooks) and has sync hooks.

    ``async_capable`` is deliberately not consulted: the mixin's hooks are sync whatever the
    class declares, and ``async_capable = False`` only makes Django build the layer in sync mode
    (the inner chain behind ``async_to_sync``, so a thread is held for the whole request).  The
    fused group runs the same hooks in the same order without that cost.
    """
    return (
        isinstance(middleware, type)
        and issubclass(middleware, MiddlewareMixin)
        and middleware.__call__ is MiddlewareMixin.__call__
        and middleware.__acall__ is MiddlewareMixin.__acall__
        and not iscoroutinefunction(getattr(middleware, "process_request", None))
        and not iscoroutinefunction(getattr(middleware, "process_response", None))
    )


def capabilities(middleware: Any, path: str) -> tuple[bool, bool]:
    can_sync = bool(getattr(middleware, "sync_capable", True))
    can_async = bool(getattr(middleware, "async_capable", False))
    if not can_sync and not can_async:
        raise RuntimeError(
            f"Middleware {path} must have at least one of sync_capable/async_capable set to True."
        )
    return can_sync, can_async


def is_sync_only(middleware: Any) -> bool:
    """Whether ``middleware`` holds a request's thread from the moment the request enters it.

    That is a middleware that cannot run async (``async_capable`` defaults to False,
    ``sync_capable`` to True, as in Django's ``load_middleware``), unless it is a hook-style
    ``MiddlewareMixin`` (:func:`is_fusable`), whose hooks run in short hops whatever it declares.
    """
    can_sync = getattr(middleware, "sync_capable", True)
    can_async = getattr(middleware, "async_capable", False)
    return bool(can_sync) and not can_async and not is_fusable(middleware)


class _LoopView(Exception):
    """Raised inside the front hop: the view is a coroutine function and must run on the loop."""


class ViewPart:
    """Django's ``BaseHandler._get_response`` on the request's thread, for a sync chain.

    It resolves the URL, runs the ``process_view`` hooks, the view, the exception hooks, the
    response check, the template-response hooks and rendering, exactly in Django's order; the
    hooks it is given must be sync.  An ``async def`` view is awaited on the request's loop
    while this thread waits (:func:`~async_handler._hop.run_on_loop`, Django's
    ``async_to_sync`` here), or, with ``loop_views`` false, raised as :class:`_LoopView` for
    the caller to await (:class:`WholeChain`).
    """

    def __init__(
        self,
        handler: BaseHandler,
        view_hooks: list[Callable[..., Any]],
        template_hooks: list[Callable[..., Any]],
        loop_views: bool = True,
    ) -> None:
        self.handler = handler
        self.view_hooks = view_hooks
        self.template_hooks = template_hooks
        self.loop_views = loop_views

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        """Return the view's response for ``request``; exceptions propagate, as Django's."""
        handler = self.handler
        response = None
        callback, args, kwargs = handler.resolve_request(request)
        for hook in self.view_hooks:
            response = hook(request, callback, args, kwargs)
            if response:
                break
        if response is None:
            wrapped = handler.make_view_atomic(callback)
            is_async = iscoroutinefunction(wrapped)
            if is_async and not self.loop_views:
                raise _LoopView(callback, wrapped, args, kwargs)
            try:
                if is_async:
                    response = run_on_loop(wrapped, request, *args, **kwargs)  # type: ignore[arg-type]
                else:
                    response = wrapped(request, *args, **kwargs)
            except Exception as exc:
                response = handler.process_exception_by_middleware(exc, request)
                if response is None:
                    raise
        handler.check_response(response, callback)
        return self.render(request, response)

    def render(self, request: HttpRequest, response: Any) -> Any:
        """The template-response hooks and ``render()``, for a response that has one."""
        handler = self.handler
        if not (hasattr(response, "render") and callable(response.render)):
            return response
        for hook in self.template_hooks:
            response = hook(request, response)
            handler.check_response(
                response,
                hook,
                name=f"{type(getattr(hook, '__self__', hook)).__name__}.process_template_response",
            )
        try:
            if iscoroutinefunction(response.render):
                return run_on_loop(response.render)
            return response.render()
        except Exception as exc:
            response = handler.process_exception_by_middleware(exc, request)
            if response is None:
                raise
            return response


class AsyncViewGuess:
    """Whether the view for a path is ``async def``, looked up in the default URLconf.

    Answers are kept per ``PATH_INFO`` (up to 1,024 paths) for the resolver in use, and dropped
    when it changes (``override_settings``, a reload): the handler asks on the loop before every
    request through a sync-only middleware, which would otherwise resolve each path twice.  A
    path that does not resolve answers ``False``.
    """

    def __init__(self) -> None:
        self._answers: dict[str, bool] = {}
        self._resolver: object = None

    def __call__(self, path_info: str) -> bool:
        resolver = get_resolver()
        answers = self._answers
        if self._resolver is not resolver:
            answers.clear()
            self._resolver = resolver
        answer = answers.get(path_info)
        if answer is None:
            try:
                answer = iscoroutinefunction(resolver.resolve(path_info).func)
            except Exception:  # Resolver404 and friends: the inner chain answers at once
                answer = False
            if len(answers) >= 1024:
                answers.clear()
            answers[path_info] = answer
        return answer


def build_sync_chain(handler: BaseHandler) -> bool:
    """Build the chain as ``load_middleware(is_async=False)`` does, entered in one hop.

    A sync-only middleware blocks its thread while the chain inside it runs, so what runs
    there costs least inline on that thread, as under ``WSGIHandler``: Django's async build
    would instead make every hook of the layers inside it a hop of its own, each a round trip
    through the loop.  So every sync-capable layer is built sync, whole requests to sync views
    run on one thread, and only what is async crosses to the loop: an ``async def`` view (or
    an async-only layer, or hook) through :func:`~async_handler._hop.run_on_loop`, and from an
    async-only layer back through :func:`~async_handler._hop.run_sync`, in place of asgiref's
    ``async_to_sync`` and ``sync_to_async``.

    Returns ``False`` and changes nothing when no sync-only middleware is left once
    ``MiddlewareNotUsed`` has dropped layers: the async build serves that chain better.
    """
    view_hooks: list[Callable[..., Any]] = []
    template_hooks: list[Callable[..., Any]] = []
    exception_hooks: list[Callable[..., Any]] = []
    handler_fn: Any = convert_exception_to_response(ViewPart(handler, view_hooks, template_hooks))
    handler_is_async = False
    blocking: list[str] = []  # outermost first
    for path in reversed(settings.MIDDLEWARE):
        middleware = import_string(path)
        can_sync, can_async = capabilities(middleware, path)
        middleware_is_async = False if (not handler_is_async and can_sync) else can_async
        adapted = _adapt(middleware_is_async, handler_fn, handler_is_async, f"middleware {path}")
        instance = instantiate(middleware, path, adapted)
        if instance is None:
            continue
        if is_sync_only(middleware):
            blocking.insert(0, path)
        if hasattr(instance, "process_view"):
            view_hooks.insert(0, _adapt(False, instance.process_view))
        if hasattr(instance, "process_template_response"):
            template_hooks.append(_adapt(False, instance.process_template_response))
        if hasattr(instance, "process_exception"):
            exception_hooks.append(handler.adapt_method_mode(False, instance.process_exception))
        handler_fn = convert_exception_to_response(instance)
        handler_is_async = middleware_is_async
    if not blocking:
        return False
    handler._view_middleware = view_hooks  # type: ignore[attr-defined]
    handler._template_response_middleware = template_hooks  # type: ignore[attr-defined]
    handler._exception_middleware = exception_hooks  # type: ignore[attr-defined]
    handler._thread_blocking_middleware = tuple(blocking)  # type: ignore[attr-defined]
    handler._middleware_chain = _adapt(True, handler_fn, handler_is_async)  # type: ignore[attr-defined]
    return True


class _OnThread:
    """A sync callable adapted for an async caller: one :func:`run_sync` hop."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        markcoroutinefunction(self)

    async def __call__(self, *args: Any) -> Any:
        return await run_sync(self.fn, *args)


class _OnLoop:
    """An async callable adapted for a sync caller on the request's thread: :func:`run_on_loop`."""

    def __init__(self, fn: Callable[..., Awaitable[Any]]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return run_on_loop(self.fn, *args)


def _adapt(
    is_async: bool, method: Any, method_is_async: bool | None = None, name: str | None = None
) -> Any:
    """Django's ``BaseHandler.adapt_method_mode``, with our hops in place of asgiref's."""
    if method_is_async is None:
        method_is_async = iscoroutinefunction(method)
    if is_async == method_is_async:
        return method
    if settings.DEBUG and name:
        kind = "Synchronous" if is_async else "Asynchronous"
        logger.debug("%s handler adapted for %s.", kind, name)
    return _OnThread(method) if is_async else _OnLoop(method)


def instantiate(middleware: Any, path: str, get_response: Any) -> Any:
    """Instantiate one middleware as Django does; ``None`` when it raises MiddlewareNotUsed."""
    try:
        instance = middleware(get_response)
    except MiddlewareNotUsed as exc:
        if settings.DEBUG:
            if str(exc):
                logger.debug("MiddlewareNotUsed(%r): %s", path, exc)
            else:
                logger.debug("MiddlewareNotUsed: %r", path)
        return None
    if instance is None:
        raise ImproperlyConfigured(f"Middleware factory {path} returned None.")
    return instance
