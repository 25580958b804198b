from django.urls import path

from . import views

urlpatterns = [
    path("", views.index, name="index"),
    path("hello/", views.hello_world, name="hello-world"),
    path("fan-out/", views.fan_out, name="fan-out"),
    path("events/", views.events_page, name="events-page"),
    path("events/stream/", views.event_stream, name="event-stream"),
    path("download/", views.download, name="download"),
    path("notes/", views.notes, name="notes"),
    path("notes/<int:pk>/", views.note_detail, name="note-detail"),
    path("request-info/", views.request_info, name="request-info"),
]
