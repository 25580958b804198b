"""Root URLconf of the montage project."""

from django.contrib import admin
from django.contrib.staticfiles.urls import staticfiles_urlpatterns
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("chat/", include("chat.urls")),
    path("", include("gallery.urls")),
]

# Under gunicorn with DEBUG on, let Django serve static files (the admin's CSS, the gallery's);
# staticfiles_urlpatterns() returns nothing when DEBUG is off.  `manage.py runserver` serves them
# itself and never reaches these patterns.
urlpatterns += staticfiles_urlpatterns()
