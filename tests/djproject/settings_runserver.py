"""The test project under ``manage.py runserver``: our app installed (its runserver command) and
the project's own WSGI application (tests/djproject/wsgi.py), as a project's settings name it."""

import importlib
import os

from tests.djproject.settings import *  # noqa: F403
from tests.djproject.settings import INSTALLED_APPS

INSTALLED_APPS = ["async_handler", *INSTALLED_APPS]
WSGI_APPLICATION = "tests.djproject.wsgi.application"

# A module of the reload test's own (in its temporary directory, on PYTHONPATH): the
# autoreloader watches the file of every imported module, so editing it restarts the server.
if os.environ.get("DJPROJECT_WATCHED_MODULE"):
    importlib.import_module(os.environ["DJPROJECT_WATCHED_MODULE"])
