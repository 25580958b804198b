from django.urls import path

from . import views

urlpatterns = [
    path("sync/hello/", views.sync_hello),
    path("sync/echo/", views.sync_echo),
    path("sync/template/", views.sync_template),
    path("sync/stream/", views.sync_stream),
    path("sync/raise/<str:kind>/", views.sync_raise),
    path("sync/sleep/", views.sync_sleep),
    path("sync/threads/", views.sync_threads),
    path("sync/cookie/", views.sync_cookie),
    path("sync/db/", views.sync_db),
    path("sync/none/", views.sync_none),
    path("async/hello/", views.async_hello),
    path("async/echo/", views.async_echo),
    path("async/template/", views.async_template),
    path("async/stream/", views.async_stream),
    path("async/raise/<str:kind>/", views.async_raise),
    path("async/sleep/", views.async_sleep),
    path("async/threads/", views.async_threads),
    path("async/db/", views.async_db),
    path("async/stream-probe/", views.async_stream_probe),
    path("async/cbv/", views.csrf_exempt(views.AsyncCBV.as_view())),
    path("async/none/", views.async_none),
    path("async/cache/", views.async_cache),
    path("file/", views.file_view),
    path("big-file/", views.big_file),
    path("observe/", views.observe),
    path("csrf/", views.csrf_protected),
    path("observe/storm/", views.storm_observe),
    path("async/wait/", views.async_wait),
    path("async/overflow-probe/", views.async_overflow_probe),
    path("sync/overflow-probe/", views.sync_overflow_probe),
    path("async/db-sleep/", views.async_db_sleep),
    path("pool/", views.pool_stats),
    path("ws/echo/", views.ws_echo),
    path("ws/whoami/", views.ws_whoami),
    path("ws/raise/<str:when>/", views.ws_raise),
    path("ws/probe/<str:tag>/", views.ws_probe),
    path("ws/chat/<slug:room>/", views.ws_chat),
    path("ws/group/<slug:group>/", views.ws_group),
    path("ws/broadcast/<slug:group>/", views.ws_broadcast),
]

handler404 = "tests.djproject.views.custom_404"
handler500 = "tests.djproject.views.custom_500"
