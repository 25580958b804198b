"""URL map of the benchmark project: one path per scenario."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("hello/", views.hello_async),
    path("hello-sync/", views.hello_sync),
    path("sleep/", views.sleep_async),
    path("sse/", views.sse_async),
    path("file/", views.big_file),
    path("upload/", views.upload_async),
]
