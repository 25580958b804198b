"""URL map of the WebSocket benchmark (benchmarks/websocket.py): the HTTP paths plus the
``@websocket`` views.  Apart from ``urls.py`` so that ``benchmarks/run.py --baseline`` can run a
checkout from before ``async_handler.websocket`` existed."""

from __future__ import annotations

from django.urls import path

from . import ws_views
from .urls import urlpatterns as http_urlpatterns

urlpatterns = [
    *http_urlpatterns,
    path("ws/echo/", ws_views.echo),
    path("ws/fanout/", ws_views.fanout),
    path("ws/fanout/send/", ws_views.fanout_send),
]
