"""Configure Django in the test process for ``tests.djproject`` without touching os.environ.

Subprocesses that the suite starts (gunicorn, runserver, the example project) inherit the
environment; a DJANGO_SETTINGS_MODULE exported here would leak into them.
"""

import django
from django.conf import settings


def ensure_django() -> None:
    if settings.configured:
        return
    from tests.djproject import settings as project_settings

    settings.configure(
        **{
            name: getattr(project_settings, name)
            for name in dir(project_settings)
            if name.isupper()
        }
    )
    django.setup()
