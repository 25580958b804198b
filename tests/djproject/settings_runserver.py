"""The test project under ``manage.py runserver``: our app installed (its runserver command) and
the project's own WSGI application (tests/djproject/wsgi.py), as a project's settings name it."""

from tests.djproject.settings import *  # noqa: F403
from tests.djproject.settings import INSTALLED_APPS

INSTALLED_APPS = ["async_handler", *INSTALLED_APPS]
WSGI_APPLICATION = "tests.djproject.wsgi.application"
