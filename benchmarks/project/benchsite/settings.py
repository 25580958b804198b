"""Settings of the benchmark project: ``startproject``'s defaults, minus what no view touches.

``BENCH_MIDDLEWARE`` selects the middleware stack: ``stock`` (the default) is the seven classes a
new project gets from ``django-admin startproject``; ``none`` is an empty stack, to show what the
handler and server cost on their own.
"""

from __future__ import annotations

import os

from django.core.exceptions import ImproperlyConfigured

# A fixed key: the project serves no sessions or signed data, and must start with no setup.
SECRET_KEY = "benchmark-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
]

STOCK_MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

_MIDDLEWARE_CHOICE = os.environ.get("BENCH_MIDDLEWARE", "stock")
if _MIDDLEWARE_CHOICE == "stock":
    MIDDLEWARE = STOCK_MIDDLEWARE
elif _MIDDLEWARE_CHOICE == "none":
    MIDDLEWARE = []
else:
    raise ImproperlyConfigured(
        f"BENCH_MIDDLEWARE must be 'stock' or 'none', got {_MIDDLEWARE_CHOICE!r}"
    )

ROOT_URLCONF = "benchsite.urls"

# No view queries the database; the session and auth middleware only need the setting to exist.
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}

USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Keep error responses quiet on stderr: a benchmark counts them, it does not need tracebacks.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django": {"handlers": ["console"], "level": "ERROR"}},
}
