import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.djproject.settings")

from async_handler import AsyncDjangoApplication

application = AsyncDjangoApplication()

from tests.djproject.views import connect_counters  # noqa: E402

connect_counters()
