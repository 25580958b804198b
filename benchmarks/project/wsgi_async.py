"""``wsgi.py`` for our worker: the WSGI entry point, served by ``AsyncDjangoApplication``."""

from __future__ import annotations

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchsite.settings")
django.setup(set_prefix=False)

from async_handler import AsyncDjangoApplication  # noqa: E402

application = AsyncDjangoApplication()
