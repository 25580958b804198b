"""Settings of the benchmark project: ``startproject``'s defaults, minus what no view touches.

``BENCH_MIDDLEWARE`` selects the middleware stack: ``stock`` (the default) is the seven classes a
new project gets from ``django-admin startproject``; ``none`` is an empty stack, to show what the
handler and server cost on their own; ``real`` is a typical project's stack: ``stock`` plus
WhiteNoise's ``WhiteNoiseMiddleware`` (where its docs place it, after ``SecurityMiddleware``) and
a function-style middleware, both sync-only.
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
elif _MIDDLEWARE_CHOICE == "real":
    MIDDLEWARE = [
        STOCK_MIDDLEWARE[0],
        "whitenoise.middleware.WhiteNoiseMiddleware",
        *STOCK_MIDDLEWARE[1:],
        "benchsite.middleware.timing_header",
    ]
else:
    raise ImproperlyConfigured(
        f"BENCH_MIDDLEWARE must be 'stock', 'none' or 'real', got {_MIDDLEWARE_CHOICE!r}"
    )

# WhiteNoise (the `real` stack) serves this folder; the others never read it.
STATIC_URL = "static/"
STATIC_ROOT = os.path.join(os.path.dirname(__file__), "static")

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
