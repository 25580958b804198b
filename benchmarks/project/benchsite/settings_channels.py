"""The benchmark project's settings plus a Channels layer, for ``asgi_channels.py``.

``InMemoryChannelLayer`` lives in one process, which is all a one-worker benchmark needs; it is
the layer Channels' documentation points to for a single process.  ``ours-layer`` in
``benchmarks/websocket.py`` runs our worker with these settings too, so that its groups go
through the same layer.
"""

from __future__ import annotations

from .settings_ws import *  # noqa: F403

CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
