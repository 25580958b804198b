import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.djproject.settings")

from async_handler import AsyncDjangoApplication  # noqa: E402

application = AsyncDjangoApplication()
