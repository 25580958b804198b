"""The montage chat's own tests (``manage.py test chat``), which use the in-process
``async_handler.websocket.testing.WebSocketClient`` as a project's test suite would: in
memory, and with the groups on Redis through channels_redis (``MONTAGE_REDIS_URL``)."""

from __future__ import annotations

import re

import pytest

from tests._support import REDIS, require_redis
from tests.montage_harness import MontageSite

#: Rooms are unique per test, so a shared Redis database is enough; this one is ours.
REDIS_DB = 12


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> MontageSite:
    return MontageSite(tmp_path_factory.mktemp("montage-chat-tests"))


def run_chat_tests(site: MontageSite, env: dict[str, str] | None = None) -> str:
    result = site.manage("test", "chat", "--noinput", "-v", "2", env=env)
    output = result.stdout + result.stderr
    ran = re.search(r"Ran (\d+) tests?", output)
    assert ran is not None and int(ran.group(1)) >= 5, output
    assert re.search(r"^OK$", output, re.MULTILINE), output
    return output


def test_chat_tests_pass_with_in_memory_groups(site: MontageSite) -> None:
    run_chat_tests(site)


def test_chat_tests_pass_with_groups_on_redis(site: MontageSite) -> None:
    require_redis()
    run_chat_tests(site, {"MONTAGE_REDIS_URL": f"redis://{REDIS[0]}:{REDIS[1]}/{REDIS_DB}"})
