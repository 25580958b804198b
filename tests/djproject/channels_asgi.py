"""The same test project served the Django Channels way, for comparisons with our worker.

``uvicorn tests.djproject.channels_asgi:application``: HTTP goes to Django's ASGI handler, and
``ws/echo/`` to a Channels ``AsyncWebsocketConsumer`` that accepts and echoes, as ``ws_echo``
does under our worker, so that one client measures both servers the same way.
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.djproject.settings")

from django.core.asgi import get_asgi_application

django_http = get_asgi_application()  # sets Django up before Channels is imported

from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402


class EchoConsumer(AsyncWebsocketConsumer):
    """Accept, then echo every message (idle until one comes)."""

    async def connect(self):
        await self.accept()

    async def receive(self, text_data=None, bytes_data=None):
        await self.send(text_data=text_data, bytes_data=bytes_data)


application = ProtocolTypeRouter(
    {
        "http": django_http,
        "websocket": URLRouter([path("ws/echo/", EchoConsumer.as_asgi())]),
    }
)
