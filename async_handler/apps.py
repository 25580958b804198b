"""Django app config: listing ``"async_handler"`` in ``INSTALLED_APPS`` enables the async runserver.

The app has no models.  Its only effects are the ``runserver`` command in
:mod:`async_handler.management.commands.runserver` and a system check that the command is not
shadowed by ``django.contrib.staticfiles``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig, apps
from django.core import checks

__all__ = ["AsyncHandlerConfig", "check_app_order"]

_STATICFILES = "django.contrib.staticfiles"


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


class AsyncHandlerConfig(AppConfig):
    """The ``async_handler`` app: provides the asyncio ``runserver`` command."""

    name = "async_handler"
    verbose_name = "Async handler"

    def ready(self) -> None:
        """Register the app-order system check."""
        checks.register(check_app_order)
