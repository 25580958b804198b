"""Two real browsers chat in the montage example's room, over WebSockets, under gunicorn.

Two headless chromium sessions (separate profiles, so separate cookies), each signed in as its
own user on the chat's login page, open the same room; each sees the other join and the
other's messages.  Once on one worker with in-memory groups, once on ``--workers 2`` with the
groups on Redis (``MONTAGE_REDIS_URL``), with the two sockets on different workers: the room
page shows which worker serves its socket.  Screenshots go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests._support import REDIS, require_redis
from tests.montage_harness import MontageSite
from tests.test_browser import chromium, screenshot, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

USERS = {"alice": "montage-Alice-pw-1", "bob": "montage-Bob-pw-2"}
#: A Redis database of its own: the room names are unique per run as well.
REDIS_DB = 11


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> MontageSite:
    site = MontageSite(tmp_path_factory.mktemp("montage-chat"))
    site.migrate()
    for name, password in USERS.items():
        site.create_superuser(name, password)
    return site


@pytest.fixture(scope="module")
def browsers() -> Iterator[tuple[WebDriver, WebDriver]]:
    with chromium() as alice, chromium() as bob:
        yield alice, bob


def sign_in_and_open(driver: WebDriver, base: str, user: str, room: str) -> None:
    """Go to the room, be sent to the login page, sign in, land in the room connected."""
    driver.get(f"{base}/chat/{room}/")
    if "/chat/login/" in driver.current_url:
        driver.find_element(By.ID, "id_username").send_keys(user)
        driver.find_element(By.ID, "id_password").send_keys(USERS[user])
        driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    wait_for(driver, f"{user} in room {room}", lambda d: d.current_url == f"{base}/chat/{room}/")
    wait_until_joined(driver, user)


def wait_until_joined(driver: WebDriver, user: str) -> None:
    # Its own join event means the socket is open and a member of the room's group.
    wait_for(driver, f"{user}'s socket connected", lambda d: text(d, "status") == "connected")
    wait_for(driver, f"{user}'s own join event", lambda d: events(d, "join", user))


def text(driver: WebDriver, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def events(driver: WebDriver, kind: str, user: str) -> list[str]:
    items = driver.find_elements(By.CSS_SELECTOR, f"#messages li.{kind}[data-user={user}]")
    return [str(item.text) for item in items]


def say(driver: WebDriver, message: str) -> None:
    box = driver.find_element(By.ID, "chat-input")
    box.send_keys(message)
    driver.find_element(By.ID, "chat-send").click()


def converse(alice: WebDriver, bob: WebDriver, room: str) -> None:
    """Bob's join (from the worker serving his socket now) reaches Alice; each one's message
    reaches both pages."""
    joined = f"bob joined (worker {text(bob, 'worker')})"
    wait_for(
        alice,
        f"'{joined}' on alice's page",
        lambda d: any(event.endswith(joined) for event in events(d, "join", "bob")),
    )
    say(alice, f"hello bob, from {room}")
    for driver in (alice, bob):
        wait_for(
            driver,
            "alice's message",
            lambda d: any(
                m.endswith(f"alice: hello bob, from {room}") for m in events(d, "message", "alice")
            ),
        )
    say(bob, "hi alice")
    for driver in (alice, bob):
        wait_for(
            driver,
            "bob's message",
            lambda d: any(m.endswith("bob: hi alice") for m in events(d, "message", "bob")),
        )
    # Each message arrived once, not once per worker or per retry.
    assert len(events(bob, "message", "alice")) == 1
    assert len(events(alice, "message", "bob")) == 1


def test_two_browsers_chat_on_one_worker(
    site: MontageSite, browsers: tuple[WebDriver, WebDriver]
) -> None:
    alice, bob = browsers
    room = f"one-{uuid.uuid4().hex[:8]}"
    server = site.gunicorn(["--threads", "4"])
    server.start()
    try:
        sign_in_and_open(alice, server.url, "alice", room)
        sign_in_and_open(bob, server.url, "bob", room)
        assert text(alice, "worker") == text(bob, "worker")
        converse(alice, bob, room)
        # Without a browser's session cookie the handshake is refused by the view.
        with pytest.raises(InvalidStatus) as refused:
            asyncio.run(_open(f"ws://{server.host}:{server.port}/chat/{room}/ws/"))
        assert refused.value.response.status_code == 403
        screenshot(alice, "chat-alice")
        screenshot(bob, "chat-bob")
    finally:
        server.cleanup()


async def _open(url: str) -> None:
    async with connect(url):
        pass


def _redis_url() -> str:
    require_redis()
    return f"redis://{REDIS[0]}:{REDIS[1]}/{REDIS_DB}"


def test_two_browsers_chat_across_two_workers_on_redis(
    site: MontageSite, browsers: tuple[WebDriver, WebDriver]
) -> None:
    alice, bob = browsers
    room = f"two-{uuid.uuid4().hex[:8]}"
    server = site.gunicorn(
        ["--threads", "4", "--workers", "2"], {"MONTAGE_REDIS_URL": _redis_url()}
    )
    server.start()
    try:
        sign_in_and_open(alice, server.url, "alice", room)
        sign_in_and_open(bob, server.url, "bob", room)
        # Which worker accepts a connection is the kernel's choice: reopen Bob's page until
        # his socket is on the other worker (each try is a new connection).
        for _ in range(30):
            if text(alice, "worker") != text(bob, "worker"):
                break
            bob.get(f"{server.url}/chat/{room}/")
            wait_until_joined(bob, "bob")
        else:
            pytest.fail(f"all of Bob's sockets landed on Alice's worker {text(alice, 'worker')}")
        converse(alice, bob, room)
        screenshot(alice, "chat-two-workers-alice")
        screenshot(bob, "chat-two-workers-bob")
    finally:
        server.cleanup()
