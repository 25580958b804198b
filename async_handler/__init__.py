"""Serve async Django views concurrently on an asyncio loop, from your existing ``wsgi.py``.

``from async_handler import AsyncDjangoApplication`` is the one public entry point for Django
projects; the gunicorn worker lives in :mod:`async_handler.worker` and the server contract in
:mod:`async_handler.contract`.  Importing this package imports neither Django nor gunicorn:
names are loaded on first use, so the protocol layer stays usable without Django.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .contract import ASYNC_KEY, POOL_KEY

if TYPE_CHECKING:
    from .handler import AsyncDjangoApplication

__version__ = "0.1.0"

__all__ = ["ASYNC_KEY", "POOL_KEY", "AsyncDjangoApplication", "__version__"]


def __getattr__(name: str) -> Any:
    # PEP 562 lazy import: the protocol and worker modules must not drag Django in.
    if name == "AsyncDjangoApplication":
        from .handler import AsyncDjangoApplication

        return AsyncDjangoApplication
    raise AttributeError(f"module 'async_handler' has no attribute {name!r}")
