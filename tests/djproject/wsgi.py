import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.djproject.settings")

from async_handler import AsyncDjangoApplication

application = AsyncDjangoApplication()

from tests.djproject.views import connect_counters  # noqa: E402

connect_counters()

from tests.djproject.ws_views import connect_lifecycle_log  # noqa: E402

connect_lifecycle_log()
