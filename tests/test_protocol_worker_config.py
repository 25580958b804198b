"""How the worker maps gunicorn settings and ``ASYNC_HANDLER_*`` variables onto ServerConfig
(in-process, no server started)."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest
from gunicorn.config import Config

from async_handler.worker import BootError, config_from_gunicorn, new_event_loop, tune_gc

pytestmark = pytest.mark.server


def gunicorn_config(**settings: object) -> Config:
    cfg = Config()
    for name, value in settings.items():
        cfg.set(name, value)
    return cfg


def test_defaults_follow_gunicorn() -> None:
    config = config_from_gunicorn(gunicorn_config(), {})
    assert config.keepalive == 2
    assert config.request_timeout == 30  # gunicorn's timeout
    assert config.header_timeout == 10
    assert (config.limit_request_line, config.limit_request_fields) == (4094, 100)
    assert config.limit_request_field_size == 8190
    assert config.max_body_size == 100 * 1024 * 1024
    assert config.spool_threshold == 1024 * 1024
    assert config.forwarded_allow_ips == ("127.0.0.1", "::1")
    assert config.secure_scheme_headers == {
        "X-FORWARDED-PROTOCOL": "ssl",
        "X-FORWARDED-PROTO": "https",
        "X-FORWARDED-SSL": "on",
    }
    assert config.script_name == "" and not config.is_ssl and not config.multiprocess
    assert config.server_header == "gunicorn"
    assert config.server_software.startswith("gunicorn/")


def test_settings_and_environment_are_mapped() -> None:
    cfg = gunicorn_config(
        keepalive=7,
        timeout=0,
        workers=3,
        limit_request_line=0,
        limit_request_fields=0,
        limit_request_field_size=0,
        forwarded_allow_ips="10.0.0.0/8, 192.168.1.1",
    )
    env = {
        "ASYNC_HANDLER_MAX_BODY_SIZE": "1000",
        "ASYNC_HANDLER_SPOOL_SIZE": "10",
        "ASYNC_HANDLER_HEADER_TIMEOUT": "2.5",
        "SCRIPT_NAME": "/app/",
    }
    config = config_from_gunicorn(cfg, env)
    assert config.keepalive == 7
    assert config.request_timeout is None  # timeout 0 and no override: off
    assert config.multiprocess
    assert config.limit_request_line == 0  # gunicorn: 0 = unlimited
    assert config.limit_request_fields == 32768  # gunicorn's ceiling for 0
    assert config.limit_request_field_size == 8190
    assert config.forwarded_allow_ips == ("10.0.0.0/8", "192.168.1.1")
    assert (config.max_body_size, config.spool_threshold) == (1000, 10)
    assert config.header_timeout == 2.5
    assert config.script_name == "/app"
    config = config_from_gunicorn(cfg, {"ASYNC_HANDLER_REQUEST_TIMEOUT": "4"})
    assert config.request_timeout == 4


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ASYNC_HANDLER_MAX_BODY_SIZE", "10MB", "must be an integer"),
        ("ASYNC_HANDLER_SPOOL_SIZE", "-1", "must be >= 0"),
        ("ASYNC_HANDLER_HEADER_TIMEOUT", "0", "must be > 0"),
        ("ASYNC_HANDLER_REQUEST_TIMEOUT", "soon", "must be a number"),
        ("ASYNC_HANDLER_REQUEST_TIMEOUT", "nan", "must be >= 0"),
        ("SCRIPT_NAME", "app", "must start with '/'"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(BootError, match=message) as info:
        config_from_gunicorn(gunicorn_config(), {name: value})
    assert name in str(info.value)


def test_invalid_server_config_is_a_boot_error() -> None:
    class Overridden:
        """A gunicorn config with a value gunicorn's own validation would not let through."""

        def __init__(self, cfg: Config, **values: object) -> None:
            self._cfg = cfg
            self._values = values

        def __getattr__(self, name: str) -> object:
            return self._values.get(name, getattr(self._cfg, name))

    with pytest.raises(BootError, match="not-an-ip"):
        config_from_gunicorn(Overridden(gunicorn_config(), forwarded_allow_ips=["not-an-ip"]), {})


def test_loop_choice() -> None:
    import uvloop

    for choice, expected in (("asyncio", asyncio.BaseEventLoop), ("uvloop", uvloop.Loop)):
        loop = new_event_loop(choice)
        try:
            assert isinstance(loop, expected)
        finally:
            loop.close()
    loop = new_event_loop("auto")
    try:
        assert isinstance(loop, uvloop.Loop)  # installed in the test extra
    finally:
        loop.close()
    with pytest.raises(BootError, match="ASYNC_HANDLER_LOOP must be one of auto, asyncio, uvloop"):
        new_event_loop("tokio")


@pytest.fixture
def gc_settings() -> Iterator[None]:
    """Restore the collector's thresholds, freeze and enabled state after a tune_gc test."""
    threshold, enabled = gc.get_threshold(), gc.isenabled()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        if enabled:
            gc.enable()
        else:
            gc.disable()


@pytest.mark.usefixtures("gc_settings")
@pytest.mark.parametrize(
    ("before", "threshold", "enabled", "after", "frozen"),
    [
        ((700, 10, 10), 50_000, True, (50_000, 10, 10), True),  # freeze, raise generation 0
        ((700, 10, 10), 0, True, (700, 10, 10), False),  # 0: hands off
        ((80_000, 5, 5), 50_000, True, (80_000, 5, 5), True),  # a higher threshold is kept
        ((700, 10, 10), 50_000, False, (700, 10, 10), False),  # gc.disable() is the app's call
    ],
)
def test_tune_gc(
    before: tuple[int, int, int],
    threshold: int,
    enabled: bool,
    after: tuple[int, int, int],
    frozen: bool,
) -> None:
    gc.set_threshold(*before)
    if not enabled:
        gc.disable()
    tune_gc(threshold)
    assert gc.get_threshold() == after
    assert (gc.get_freeze_count() > 0) is frozen
    assert gc.isenabled() is enabled
