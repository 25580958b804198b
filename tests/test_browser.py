"""A real browser against the montage example under our gunicorn worker.

Headless Debian chromium, driven through chromedriver by selenium, logs into the admin, creates
a note there, submits the example's CSRF-protected ModelForm (async ORM ``acreate``), and
watches the server-sent-events page fill in live.  Screenshots go to
``test-artifacts/browser/`` at the repository root (gitignored) for a human to look at.

The same server also answers the 2016 recipe's promise without a browser: a hundred concurrent
``hello_world`` requests, each sleeping one second, finish in about one second.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests._support import REPO_ROOT, require_program
from tests.montage_harness import MontageSite
from tests.server import GunicornServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ARTIFACTS = REPO_ROOT / "test-artifacts" / "browser"
ADMIN_USER = "admin"
ADMIN_PASSWORD = "montage-Admin-pw-1"  # passes Django's password validators
WAIT = 20.0

CHROME_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    site = MontageSite(tmp_path_factory.mktemp("montage-browser"))
    site.migrate()
    site.create_superuser(ADMIN_USER, ADMIN_PASSWORD)
    server = site.gunicorn(["--threads", "4"])
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@contextlib.contextmanager
def chromium() -> Iterator[WebDriver]:
    """One headless browser with a profile (cookie jar) of its own."""
    binary = require_program("chromium", "apt-get install chromium")
    chromedriver = require_program("chromedriver", "apt-get install chromium-driver")
    with tempfile.TemporaryDirectory(prefix="ah-chromium-") as profile:
        options = Options()
        options.binary_location = binary
        for flag in CHROME_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        # Both paths are explicit, so selenium never tries to download a driver or browser.
        driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
        driver.set_page_load_timeout(WAIT)
        try:
            yield driver
        finally:
            driver.quit()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    with chromium() as driver:
        yield driver


def screenshot(driver: WebDriver, name: str) -> Path:
    """Save the viewport as ``test-artifacts/browser/<name>.png``; return the path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"chromium could not write {path}"
    assert path.stat().st_size > 0
    return path


def wait_for(driver: WebDriver, what: str, condition: object) -> object:
    """Wait up to ``WAIT`` seconds for ``condition(driver)`` to be truthy."""
    return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(condition, message=what)


def admin_login(driver: WebDriver, base: str) -> None:
    driver.get(f"{base}/admin/login/?next=/admin/")
    driver.find_element(By.ID, "id_username").send_keys(ADMIN_USER)
    driver.find_element(By.ID, "id_password").send_keys(ADMIN_PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "#login-form input[type=submit]").click()
    wait_for(driver, "the admin index after login", lambda d: d.current_url == f"{base}/admin/")
    assert "Site administration" in driver.title


async def _raw_get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        return await asyncio.wait_for(reader.read(), 15.0)
    finally:
        writer.close()
        await writer.wait_closed()


async def _concurrent_raw_gets(port: int, path: str, n: int) -> list[bytes]:
    return await asyncio.gather(*(_raw_get(port, path) for _ in range(n)))


def test_hundred_concurrent_hello_world(server: GunicornServer) -> None:
    # One worker, four threads: only the event loop can serve these at once.
    started = time.monotonic()
    answers = asyncio.run(_concurrent_raw_gets(server.port, "/hello/", 100))
    elapsed = time.monotonic() - started
    bad = [a for a in answers if not a.startswith(b"HTTP/1.1 200 ")]
    assert not bad, bad[:3]
    assert all(a.endswith(b"\r\n\r\nHello, world") for a in answers)
    # About one second; the margin is Django's per-request work on a small, shared CI machine.
    assert elapsed < 2.0, f"100 concurrent one-second views took {elapsed:.2f}s"


def test_admin_login_and_create_note(server: GunicornServer, browser: WebDriver) -> None:
    admin_login(browser, server.url)
    # The admin's stylesheet came through the worker too (staticfiles_urlpatterns, DEBUG on).
    assert httpx.get(f"{server.url}/static/admin/css/base.css").status_code == 200
    browser.get(f"{server.url}/admin/gallery/note/add/")
    browser.find_element(By.ID, "id_title").send_keys("Written in the admin")
    browser.find_element(By.ID, "id_body").send_keys("Saved through the AsyncioWorker.")
    browser.find_element(By.CSS_SELECTOR, "input[name=_save]").click()
    message = wait_for(
        browser,
        "the admin's success message",
        lambda d: d.find_elements(By.CSS_SELECTOR, ".messagelist .success"),
    )
    assert isinstance(message, list)
    assert "was added successfully" in message[0].text
    screenshot(browser, "admin-note-added")

    browser.get(f"{server.url}/notes/")
    titles = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#notes a")]
    assert "Written in the admin" in titles


def test_csrf_protected_form_creates_note(server: GunicornServer, browser: WebDriver) -> None:
    browser.get(f"{server.url}/notes/")
    token = browser.find_element(By.NAME, "csrfmiddlewaretoken").get_attribute("value")
    assert token
    browser.find_element(By.ID, "id_title").send_keys("From the async form")
    browser.find_element(By.ID, "id_body").send_keys("acreate() on the worker's loop")
    browser.find_element(By.CSS_SELECTOR, "#note-form button[type=submit]").click()
    wait_for(
        browser,
        "the redirect to the new note",
        lambda d: re.search(r"/notes/\d+/$", d.current_url) is not None,
    )
    assert browser.find_element(By.ID, "note-title").text == "From the async form"
    assert "acreate() on the worker's loop" in browser.find_element(By.ID, "note-body").text
    screenshot(browser, "note-created")

    # The same POST without the browser's cookie and token is refused by CsrfViewMiddleware.
    forged = httpx.post(
        f"{server.url}/notes/", data={"title": "forged", "body": ""}, follow_redirects=False
    )
    assert forged.status_code == 403
    assert "CSRF" in forged.text


def test_event_stream_page_updates_live(server: GunicornServer, browser: WebDriver) -> None:
    count, interval = 6, 0.4
    browser.get(f"{server.url}/events/?count={count}&interval={interval}")
    samples: list[tuple[float, int, str]] = []
    started = time.monotonic()

    def progress(driver: WebDriver) -> bool:
        received = int(driver.find_element(By.ID, "count").text)
        status = driver.find_element(By.ID, "status").text
        samples.append((time.monotonic() - started, received, status))
        return received >= 3

    wait_for(browser, "three server-sent events on the page", progress)
    screenshot(browser, "events-live")

    def finished(driver: WebDriver) -> bool:
        progress(driver)
        return driver.find_element(By.ID, "status").text == "done"

    wait_for(browser, "the stream's done event", finished)
    items = browser.find_elements(By.CSS_SELECTOR, "#events li.event")
    assert [item.text.split(" at ")[0] for item in items] == [
        f"tick {n} of {count}" for n in range(1, count + 1)
    ]
    # Live, not delivered in one piece at the end: the page showed some events while the
    # stream was still open.
    assert any(0 < received < count and status == "open" for _, received, status in samples), (
        samples
    )
    screenshot(browser, "events-done")
