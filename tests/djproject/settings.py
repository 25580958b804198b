"""Settings of the Django project the handler tests run (parity, threads, connections)."""

import os
import tempfile
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent

SECRET_KEY = "tests-only-not-secret"
DEBUG = os.environ.get("DJPROJECT_DEBUG") == "1"
ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]
ROOT_URLCONF = "tests.djproject.urls"
USE_TZ = True

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.messages",
]

MIDDLEWARE = [
    "tests.djproject.middleware.async_only_middleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "tests.djproject.middleware.sync_only_middleware",
    "tests.djproject.middleware.HookMiddleware",
]

# DJPROJECT_MIDDLEWARE=async keeps only layers that never hold a thread across the view, for the
# end-to-end concurrency tests (a sync-only middleware costs a thread per in-flight request).
if os.environ.get("DJPROJECT_MIDDLEWARE") == "async":
    MIDDLEWARE = ["tests.djproject.middleware.async_only_middleware"]
# DJPROJECT_MIDDLEWARE=syncstack is a real project's stack: startproject's seven, WhiteNoise and
# two sync-only middleware (a function, and a MiddlewareMixin with async_capable = False).
elif os.environ.get("DJPROJECT_MIDDLEWARE") == "syncstack":
    MIDDLEWARE = [
        "django.middleware.security.SecurityMiddleware",
        "whitenoise.middleware.WhiteNoiseMiddleware",
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
        "django.middleware.clickjacking.XFrameOptionsMiddleware",
        "tests.djproject.middleware.function_middleware",
        "tests.djproject.middleware.SyncOnlyMixinMiddleware",
    ]

# WhiteNoise (in the syncstack variant) serves this directory under STATIC_URL.
STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / "static"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": []},
    }
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(tempfile.gettempdir(), f"async-handler-tests-{os.getpid()}.sqlite3"),
    },
    # The connection tests count this alias's sessions in pg_stat_activity by application_name.
    "pg": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("PGDATABASE", "test"),
        "USER": os.environ.get("PGUSER", "postgres"),
        "HOST": os.environ.get("PGHOST", "127.0.0.1"),
        "PORT": os.environ.get("PGPORT", "5432"),
        "CONN_MAX_AGE": 60,
        "OPTIONS": {"application_name": os.environ.get("PG_APPNAME", "async_handler_tests")},
    },
}

# Small, so that the parity tests can trigger RequestDataTooBig.
DATA_UPLOAD_MAX_MEMORY_SIZE = 4096
ASYNC_HANDLER_THREADS = int(os.environ.get("ASYNC_HANDLER_THREADS", "4"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"null": {"class": "logging.NullHandler"}},
    # Error responses are expected by the thousand here; keep the test output readable.
    "loggers": {"django.request": {"handlers": ["null"], "propagate": False}},
}

# DJPROJECT_REDIS_PREFIX puts WebSocket groups on a channels_redis layer under that key prefix,
# shared by every worker and master started with it (the cross-process broadcast tests).
if os.environ.get("DJPROJECT_REDIS_PREFIX"):
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [os.environ.get("DJPROJECT_REDIS_URL", "redis://127.0.0.1:6379/0")],
                "prefix": os.environ["DJPROJECT_REDIS_PREFIX"],
            },
        }
    }
if os.environ.get("DJPROJECT_WS_OUTBOX"):
    ASYNC_HANDLER_WS_OUTBOX_SIZE = int(os.environ["DJPROJECT_WS_OUTBOX"])
if os.environ.get("DJPROJECT_WS_FINISH_GRACE"):
    ASYNC_HANDLER_WS_FINISH_GRACE = float(os.environ["DJPROJECT_WS_FINISH_GRACE"])
