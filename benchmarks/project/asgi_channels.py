"""``asgi.py`` of a Channels project: Django's ASGI app for HTTP, Channels' ``URLRouter`` for
WebSockets (``benchsite/consumers.py``), as the Channels tutorial lays it out."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchsite.settings_channels")
# Set up Django (the app registry) before importing consumers, as Channels' docs require.
django_asgi_app = get_asgi_application()

from benchsite import consumers  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter(
            [
                path("ws/echo/", consumers.Echo.as_asgi()),
                path("ws/fanout/", consumers.Fanout.as_asgi()),
                path("ws/fanout/send/", consumers.FanoutSend.as_asgi()),
            ]
        ),
    }
)
