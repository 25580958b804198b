"""Django app config: listing ``"async_handler"`` in ``INSTALLED_APPS`` enables the async runserver.

The app has no models.  Its only effects are the ``runserver`` command in
:mod:`async_handler.management.commands.runserver`, a system check that the command is not
shadowed by ``django.contrib.staticfiles``, and one naming sync-only middleware.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig, apps
from django.core import checks

__all__ = [
    "AsyncHandlerConfig",
    "check_app_order",
    "check_in_memory_groups",
    "check_sync_only_middleware",
]

_STATICFILES = "django.contrib.staticfiles"
_WHITENOISE = "whitenoise"


def check_app_order(app_configs: Sequence[AppConfig] | None = None, **kwargs: Any) -> list[Any]:
    """Warn (``async_handler.W001``) when staticfiles would shadow our ``runserver``.

    Django takes a management command from the *first* app in ``INSTALLED_APPS`` that defines
    it, and ``django.contrib.staticfiles`` defines ``runserver`` too.
    """
    names = [config.name for config in apps.get_app_configs()]
    if _STATICFILES in names and names.index(_STATICFILES) < names.index(AsyncHandlerConfig.name):
        return [
            checks.Warning(
                f"'async_handler' comes after '{_STATICFILES}' in INSTALLED_APPS, so "
                "`manage.py runserver` is staticfiles' threaded server, not the asyncio one.",
                hint=f"Move 'async_handler' above '{_STATICFILES}' in INSTALLED_APPS.",
                id="async_handler.W001",
            )
        ]
    return []


def check_sync_only_middleware(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[Any]:
    """Warn (``async_handler.W002``) once for each sync-only middleware in ``MIDDLEWARE``.

    Such a layer calls the rest of the chain synchronously, so each request through it holds a
    thread from the moment it enters that layer until its response leaves it, async view
    included.  Paths that fail to import are left to Django's own errors.
    """
    from django.conf import settings
    from django.utils.module_loading import import_string

    from .chain import is_sync_only  # imports Django's handler machinery: not at app loading

    found = []
    for path in getattr(settings, "MIDDLEWARE", None) or ():
        try:
            middleware = import_string(path)
        except Exception:  # any import failure is reported when the chain loads, not here
            continue
        if not is_sync_only(middleware):
            continue
        hint = (
            "Make it async-capable (django.utils.decorators.sync_and_async_middleware) or "
            "replace it with an async-capable middleware."
        )
        if path.startswith(f"{_WHITENOISE}.") or str(
            getattr(middleware, "__module__", "")
        ).startswith(f"{_WHITENOISE}."):
            hint += (
                " For WhiteNoise, ServeStatic's servestatic.middleware.ServeStaticMiddleware is "
                "an async-capable replacement."
            )
        found.append(
            checks.Warning(
                f"Middleware {path!r} is sync-only: every request through it holds a thread for "
                "its whole life (a thread per in-flight request), async views included.",
                hint=hint,
                id="async_handler.W002",
            )
        )
    return found


def _worker_count() -> int:
    """Workers serving this app: ``ASYNC_HANDLER_WORKERS`` (set by our worker), else gunicorn's
    ``WEB_CONCURRENCY``; 1 when neither is a number."""
    for name in ("ASYNC_HANDLER_WORKERS", "WEB_CONCURRENCY"):
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    return 1


def _routes_websockets(patterns: Sequence[Any]) -> bool:
    from django.urls import URLResolver

    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            if _routes_websockets(pattern.url_patterns):
                return True
        elif getattr(getattr(pattern, "callback", None), "async_handler_websocket", False):
            return True
    return False


def _has_websocket_views() -> bool:
    """Whether the root URLconf routes to a ``@websocket`` view (a URLconf that fails to load
    counts as one: Django's own checks report the failure, and this one stays on the safe side).
    """
    from django.urls import get_resolver

    try:
        return _routes_websockets(get_resolver().url_patterns)
    except Exception:
        return True


def check_in_memory_groups(
    app_configs: Sequence[AppConfig] | None = None, **kwargs: Any
) -> list[Any]:
    """Warn (``async_handler.W003``) when WebSocket groups are in memory across workers.

    Without ``CHANNEL_LAYERS`` a broadcast reaches only the sockets of the worker that sent it.
    A project without ``@websocket`` views has no groups to split, and is not warned.
    """
    from django.conf import settings

    workers = _worker_count()
    if getattr(settings, "CHANNEL_LAYERS", None) or workers <= 1 or not _has_websocket_views():
        return []
    return [
        checks.Warning(
            f"{workers} workers but no CHANNEL_LAYERS: WebSocket groups are per worker process, "
            "so broadcast() reaches only the sockets on the worker that sends it.",
            hint="Install django-async-handler[redis] and configure CHANNEL_LAYERS with "
            "channels_redis.core.RedisChannelLayer.",
            id="async_handler.W003",
        )
    ]


class AsyncHandlerConfig(AppConfig):
    """The ``async_handler`` app: provides the asyncio ``runserver`` command."""

    name = "async_handler"
    verbose_name = "Async handler"

    def ready(self) -> None:
        """Register the app-order, sync-only middleware and in-memory groups system checks."""
        checks.register(check_app_order)
        checks.register(check_sync_only_middleware)
        checks.register(check_in_memory_groups)
