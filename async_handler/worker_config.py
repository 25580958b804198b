"""The worker's settings: gunicorn's configuration and the ``ASYNC_HANDLER_*`` environment
variables translated into a :class:`~async_handler.http.config.ServerConfig`, the loop choice and
the collector tuning (:func:`tune_gc`).  Worker layer: imports gunicorn.

Knobs gunicorn lacks come from environment variables (``--env`` sets them):

``ASYNC_HANDLER_LOOP``
    ``auto`` (uvloop when installed; default), ``asyncio`` or ``uvloop``.
``ASYNC_HANDLER_MAX_BODY_SIZE``
    Largest request body in bytes (default 104857600; ``0`` = no limit).
``ASYNC_HANDLER_SPOOL_SIZE``
    Request bodies above this many bytes go to a temporary file (default 1048576).
``ASYNC_HANDLER_HEADER_TIMEOUT``
    Seconds allowed to receive a request head (default 10).
``ASYNC_HANDLER_REQUEST_TIMEOUT``
    Seconds an async view may take before its response starts (default: gunicorn's
    ``timeout``; ``0`` = off).
``ASYNC_HANDLER_SEND_TIMEOUT``
    Seconds a client may go without accepting response bytes before it is dropped (default
    60; ``0`` = off).
``ASYNC_HANDLER_WS_PING_INTERVAL``, ``ASYNC_HANDLER_WS_PING_TIMEOUT``
    WebSocket keep-alive: seconds between pings, and how long one may go unanswered before the
    socket closes with 1011 (defaults 20 and 20, as uvicorn and websockets; ``0`` = off).
``ASYNC_HANDLER_WS_MAX_MESSAGE``
    Largest WebSocket message in bytes, else close 1009 (default 1048576, as Daphne; ``0`` =
    no limit).
``ASYNC_HANDLER_WS_MAX_QUEUE``
    Received messages a WebSocket view has not read yet before reading pauses (default 16).
``ASYNC_HANDLER_WS_OPEN_TIMEOUT``, ``ASYNC_HANDLER_WS_CLOSE_TIMEOUT``
    Seconds a view may take to accept or refuse a handshake (else 503), and to wait for the
    peer's close frame (defaults 10 and 10).
``ASYNC_HANDLER_WS_DEFLATE``
    ``1`` (default) offers permessage-deflate; ``0`` does not.
``ASYNC_HANDLER_GC_THRESHOLD``
    Once the application is loaded, freeze what exists (``gc.freeze()``) and raise the cyclic
    collector's generation-0 threshold to this many objects (default 50000; ``0`` leaves the
    collector as the application configured it).  See :func:`tune_gc`.

An invalid value stops the worker at boot with an error naming the variable.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Mapping
from typing import Any

from gunicorn import SERVER, SERVER_SOFTWARE

from .http.config import ServerConfig, WebSocketConfig

__all__ = [
    "DEFAULT_GC_THRESHOLD",
    "BootError",
    "config_from_gunicorn",
    "env_number",
    "new_event_loop",
    "tune_gc",
]

# gunicorn's own ceilings for its limit settings (gunicorn/http/message.py).
_MAX_REQUEST_LINE = 8190
_MAX_HEADERS = 32768
_DEFAULT_FIELD_SIZE = 8190

_LOOP_CHOICES = ("auto", "asyncio", "uvloop")


#: Default ``ASYNC_HANDLER_GC_THRESHOLD``: measured on the benchmark project (Django, startproject's
#: middleware), collection cost per request fell from 99 to 29 µs (async hello, 100 connections)
#: and from 325 to 73 µs (100 ms awaits, 1,000 connections), for 5 MiB and 30 MiB more RSS.
DEFAULT_GC_THRESHOLD = 50_000


class BootError(Exception):
    """A setting that makes the worker unable to start; the message names the setting."""


def new_event_loop(choice: str) -> asyncio.AbstractEventLoop:
    """Return a new loop for ``ASYNC_HANDLER_LOOP=choice`` (``auto``, ``asyncio``, ``uvloop``)."""
    if choice not in _LOOP_CHOICES:
        raise BootError(
            f"ASYNC_HANDLER_LOOP must be one of {', '.join(_LOOP_CHOICES)}, got {choice!r}"
        )
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise BootError(
                    "ASYNC_HANDLER_LOOP=uvloop but uvloop is not installed "
                    "(pip install 'django-async-handler[uvloop]')"
                ) from None
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


def env_number(env: Mapping[str, str], name: str, default: float, *, integer: bool) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise BootError(f"{name} must be {kind}, got {raw!r}") from None
    if value < 0 or value != value:  # negative or NaN
        raise BootError(f"{name} must be >= 0, got {raw!r}")
    return value


def tune_gc(threshold: int) -> None:
    """Set the cyclic garbage collector up for serving, once the application is loaded.

    Django's contrib middleware leave each request in reference cycles (``request.user``'s lazy
    closure, ``request.auser``, the messages storage).  The application breaks those when it
    can prove nothing else holds the request (``async_handler._cycles``); every other cycle an
    application makes still ends as garbage only the cyclic collector frees.  Under concurrency
    the objects in flight are traversed at every young collection and promoted, and garbage
    that reaches the oldest generation waits for collections that walk the whole heap: on the
    benchmark project, before the cycles were broken, the collector took 23% of the worker's
    CPU with 100 connections and 57% with 1,000 waiting ones.

    ``gc.freeze()`` moves everything alive now (modules, settings, the URL resolver: objects
    that live as long as the process) out of every later collection, and a generation-0
    threshold of ``threshold`` objects instead of 700 lets most requests end, and their cycles
    be freed in one young collection, before anything of theirs is promoted.  The price is
    memory: up to about ``threshold`` unreachable objects wait for their collection.

    ``threshold <= 0`` does nothing.  Nor does a disabled collector (an application that runs
    ``gc.disable()`` has chosen), and a generation-0 threshold the application already set
    higher is kept.
    """
    if threshold <= 0 or not gc.isenabled():
        return
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    if young < threshold:
        gc.set_threshold(threshold, middle, old)


def websocket_config(env: Mapping[str, str]) -> WebSocketConfig:
    """The ``ASYNC_HANDLER_WS_*`` variables as a :class:`WebSocketConfig`."""

    def optional(name: str, default: float) -> float | None:
        return env_number(env, name, default, integer=False) or None

    def positive(name: str, default: float) -> float:
        value = env_number(env, name, default, integer=False)
        if value == 0:
            raise BootError(f"{name} must be > 0")
        return value

    deflate = env.get("ASYNC_HANDLER_WS_DEFLATE", "1").strip()
    if deflate not in ("0", "1"):
        raise BootError(f"ASYNC_HANDLER_WS_DEFLATE must be 0 or 1, got {deflate!r}")
    max_queue = env_number(env, "ASYNC_HANDLER_WS_MAX_QUEUE", 16, integer=True)
    if max_queue == 0:
        raise BootError("ASYNC_HANDLER_WS_MAX_QUEUE must be >= 1")
    return WebSocketConfig(
        ping_interval=optional("ASYNC_HANDLER_WS_PING_INTERVAL", 20.0),
        ping_timeout=optional("ASYNC_HANDLER_WS_PING_TIMEOUT", 20.0),
        max_message=int(env_number(env, "ASYNC_HANDLER_WS_MAX_MESSAGE", 1 << 20, integer=True))
        or None,
        max_queue=int(max_queue),
        open_timeout=positive("ASYNC_HANDLER_WS_OPEN_TIMEOUT", 10.0),
        close_timeout=positive("ASYNC_HANDLER_WS_CLOSE_TIMEOUT", 10.0),
        deflate=deflate == "1",
    )


def config_from_gunicorn(cfg: Any, env: Mapping[str, str]) -> ServerConfig:
    """Map gunicorn settings plus ``ASYNC_HANDLER_*`` variables in ``env`` onto a
    :class:`ServerConfig`; raises :class:`BootError` naming the offending variable."""
    max_body = int(env_number(env, "ASYNC_HANDLER_MAX_BODY_SIZE", 100 * 1024 * 1024, integer=True))
    spool = int(env_number(env, "ASYNC_HANDLER_SPOOL_SIZE", 1024 * 1024, integer=True))
    header_timeout = env_number(env, "ASYNC_HANDLER_HEADER_TIMEOUT", 10.0, integer=False)
    if header_timeout == 0:
        raise BootError("ASYNC_HANDLER_HEADER_TIMEOUT must be > 0 (it guards against slowloris)")
    request_timeout = env_number(
        env, "ASYNC_HANDLER_REQUEST_TIMEOUT", float(cfg.timeout or 0), integer=False
    )
    send_timeout = env_number(env, "ASYNC_HANDLER_SEND_TIMEOUT", 60.0, integer=False)
    websocket = websocket_config(env)
    line = cfg.limit_request_line
    if line < 0 or line > _MAX_REQUEST_LINE:
        line = _MAX_REQUEST_LINE
    fields = cfg.limit_request_fields
    if fields <= 0 or fields > _MAX_HEADERS:
        fields = _MAX_HEADERS
    field_size = cfg.limit_request_field_size
    if field_size <= 0:
        field_size = _DEFAULT_FIELD_SIZE
    script_name = env.get("SCRIPT_NAME", "").rstrip("/")
    if script_name and not script_name.startswith("/"):
        raise BootError(f"SCRIPT_NAME must start with '/', got {script_name!r}")
    allowed = cfg.forwarded_allow_ips
    if isinstance(allowed, str):
        allowed = allowed.split(",")
    try:
        return ServerConfig(
            keepalive=float(cfg.keepalive),
            header_timeout=header_timeout,
            request_timeout=request_timeout or None,
            send_timeout=send_timeout or None,
            limit_request_line=line,
            limit_request_fields=fields,
            limit_request_field_size=field_size,
            max_body_size=max_body,
            spool_threshold=spool,
            script_name=script_name,
            forwarded_allow_ips=tuple(str(a).strip() for a in allowed),
            secure_scheme_headers=dict(cfg.secure_scheme_headers or {}),
            is_ssl=bool(cfg.is_ssl),
            multiprocess=cfg.workers > 1,
            server_software=SERVER_SOFTWARE,
            server_header=SERVER,
            websocket=websocket,
        )
    except (TypeError, ValueError) as exc:
        raise BootError(str(exc)) from None
