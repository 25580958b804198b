"""Settings of the montage example project.

Every setting a deployment changes comes from the environment, so the tests (and you) can run it
against a throw-away database without editing this file:

``MONTAGE_DB``
    Path of the SQLite database file (default: ``db.sqlite3`` beside ``manage.py``).
``MONTAGE_DEBUG``
    ``1`` (default) or ``0``.
``MONTAGE_SECRET_KEY``
    Required when ``MONTAGE_DEBUG=0``; a fixed development key is used otherwise.
``MONTAGE_ALLOWED_HOSTS``
    Comma-separated host names (default: the loopback names).
``MONTAGE_REDIS_URL``
    A Redis URL (``redis://127.0.0.1:6379/0``) for the chat's groups, so that a message
    reaches the sockets of every gunicorn worker (needs ``django-async-handler[redis]``).
    Unset: groups are in memory, within each worker.
"""

import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be 1/0, true/false, yes/no or on/off, got {raw!r}")


DEBUG = _env_flag("MONTAGE_DEBUG", True)

SECRET_KEY = os.environ.get("MONTAGE_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("MONTAGE_SECRET_KEY must be set when MONTAGE_DEBUG=0")
    SECRET_KEY = "django-insecure-montage-example-key-for-development-only"

ALLOWED_HOSTS = [
    host.strip()
    for host in os.environ.get("MONTAGE_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]").split(",")
    if host.strip()
]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    # Above staticfiles, so that `manage.py runserver` is async_handler's asyncio server.
    "async_handler",
    "django.contrib.staticfiles",
    "gallery",
    "chat",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "montage.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "montage.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("MONTAGE_DB") or BASE_DIR / "db.sqlite3",
        # Concurrent requests write from several pool threads; wait for SQLite's file lock
        # instead of failing at once with "database is locked".
        "OPTIONS": {"timeout": 20},
    }
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# The chat's WebSocket groups (async_handler.websocket.groups): on Redis through Channels'
# layer when configured, so that every worker shares them; else in memory, per worker (the
# async_handler.W003 check warns about that with more than one worker).
REDIS_URL = os.environ.get("MONTAGE_REDIS_URL", "")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
