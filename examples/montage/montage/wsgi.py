"""WSGI entry point of the montage project.

``AsyncDjangoApplication`` is a drop-in ``WSGIHandler``: under the ``AsyncioWorker`` gunicorn
worker (see ``gunicorn.conf.py``) its async views are awaited on the worker's event loop; under any
other WSGI server it behaves like Django's own handler.
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "montage.settings")

from async_handler import AsyncDjangoApplication

application = AsyncDjangoApplication()
