"""The benchmark project's settings for benchmarks/websocket.py: its URL map has the
``@websocket`` views (see ``ws_urls.py``)."""

from __future__ import annotations

from .settings import *  # noqa: F403

ROOT_URLCONF = "benchsite.ws_urls"
