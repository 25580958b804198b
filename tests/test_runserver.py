"""``manage.py runserver`` with ``"async_handler"`` installed: the asyncio development server.

Every test starts the real command in a subprocess against a copy of the montage example
(so the reload test can edit a view) with its own SQLite database, and talks to it over
loopback with a real HTTP client.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import django
import httpx
import pytest

from tests.montage_harness import MontageSite, RunserverProcess

pytestmark = pytest.mark.timeout(180)

CONCURRENCY = 50
DJANGO_DIR = Path(django.__file__).parent


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> MontageSite:
    site = MontageSite(tmp_path_factory.mktemp("montage-runserver"), copy_source=True)
    site.migrate()
    return site


@pytest.fixture(scope="module")
def server(site: MontageSite) -> Iterator[RunserverProcess]:
    # Four threads for sync code: were async views run one per thread, 50 one-second requests
    # would take at least 13 s.
    with site.runserver("--noreload", "--threads", "4") as server:
        yield server


async def _concurrent_gets(url: str, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=15.0) as client:
        return await asyncio.gather(*(client.get(url) for _ in range(n)))


def test_banner(server: RunserverProcess) -> None:
    log = server.wait_for_log(r"Quit the server with CONTROL-C\.")
    text = server.log_text()
    assert f"Starting development server at http://127.0.0.1:{server.port}/" in text
    assert "using settings 'montage.settings'" in text
    assert "asyncio event loop (async_handler), 4 threads for sync code" in text
    assert "System check identified no issues" in text[: log.start()]


def test_concurrent_async_views_are_awaited_on_one_loop(server: RunserverProcess) -> None:
    started = time.monotonic()
    responses = asyncio.run(_concurrent_gets(server.url + "/hello/", CONCURRENCY))
    elapsed = time.monotonic() - started
    assert [r.status_code for r in responses] == [200] * CONCURRENCY
    assert {r.text for r in responses} == {"Hello, world"}
    assert not responses[0].headers.get("server", "").startswith("WSGIServer")
    assert elapsed < 2.0, f"{CONCURRENCY} concurrent sleep(1) views took {elapsed:.2f}s"


def test_static_files(server: RunserverProcess, site: MontageSite) -> None:
    css = httpx.get(server.url + "/static/gallery/style.css")
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    assert css.content == (site.project / "gallery/static/gallery/style.css").read_bytes()
    assert int(css.headers["content-length"]) == len(css.content)
    # An app's static file from Django itself, found by the staticfiles finders.
    admin_css = httpx.get(server.url + "/static/admin/css/base.css")
    assert admin_css.status_code == 200
    admin_file = DJANGO_DIR / "contrib/admin/static/admin/css/base.css"
    assert admin_css.content == admin_file.read_bytes()
    assert httpx.get(server.url + "/static/gallery/missing.css").status_code == 404


def test_request_log_lines(server: RunserverProcess) -> None:
    assert httpx.get(server.url + "/fan-out/?n=2&step=0").status_code == 200
    assert httpx.get(server.url + "/no-such-page/").status_code == 404
    bad = httpx.get(server.url + "/fan-out/?n=zero")
    assert bad.status_code == 400
    download = httpx.get(server.url + "/download/")
    assert download.status_code == 200
    server.wait_for_log(r'\] "GET /fan-out/\?n=2&step=0 HTTP/1\.1" 200 \d+\n')
    server.wait_for_log(r'\] "GET /no-such-page/ HTTP/1\.1" 404 \d+\n')
    server.wait_for_log(rf'\] "GET /fan-out/\?n=zero HTTP/1\.1" 400 {len(bad.content)}\n')
    server.wait_for_log(rf'\] "GET /download/ HTTP/1\.1" 200 {len(download.content)}\n')


def test_async_orm_form_with_csrf(server: RunserverProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        page = client.get("/notes/")
        assert page.status_code == 200
        match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert match is not None, page.text[:2000]
        created = client.post(
            "/notes/",
            data={
                "csrfmiddlewaretoken": match.group(1),
                "title": "Via runserver",
                "body": "async ORM",
            },
        )
        assert created.status_code == 302
        assert re.fullmatch(r"/notes/\d+/", created.headers["location"])
        detail = client.get(created.headers["location"])
        assert detail.status_code == 200
        assert "Via runserver" in detail.text
        refused = httpx.post(server.url + "/notes/", data={"title": "no token"})
        assert refused.status_code == 403


def test_autoreload_serves_the_edited_view(tmp_path: Path) -> None:
    site = MontageSite(tmp_path, copy_source=True)
    views = site.project / "gallery" / "views.py"
    source = views.read_text()
    assert source.count('"Hello, world"') == 1
    with site.runserver() as server:
        assert httpx.get(server.url + "/hello/").text == "Hello, world"
        views.write_text(source.replace('"Hello, world"', '"Hello, reloaded world"'))
        deadline = time.monotonic() + 30.0
        next_touch = time.monotonic() + 2.0
        while True:
            try:
                text: str | None = httpx.get(server.url + "/hello/", timeout=5.0).text
            except httpx.HTTPError:
                text = None  # the old process is gone, the new one not yet listening
            if text == "Hello, reloaded world":
                break
            now = time.monotonic()
            if now >= deadline:
                pytest.fail(f"the edited view was never served:\n{server.log_text()}")
            if now >= next_touch:
                # The reloader may have taken its first snapshot after our edit: touch again.
                views.write_text(views.read_text())
                next_touch = now + 2.0
            time.sleep(0.1)
        log = server.log_text()
        assert re.search(r"gallery/views\.py changed, reloading\.", log), log
        # The restarted process is the asyncio server again.
        assert log.count("asyncio event loop (async_handler)") >= 2, log


def test_wsgi_option_falls_back_to_djangos_server(site: MontageSite) -> None:
    with site.runserver("--noreload", "--wsgi") as server:
        response = httpx.get(server.url + "/hello/")
        assert response.status_code == 200
        assert response.text == "Hello, world"
        # wsgiref's server, which Django's runserver is built on, names itself.
        assert response.headers["server"].startswith("WSGIServer/")
        css = httpx.get(server.url + "/static/gallery/style.css")
        assert css.status_code == 200
        log = server.log_text()
        # Django 6.0 says "Starting WSGI development server at"; 5.2 leaves out "WSGI".
        started = rf"Starting (WSGI )?development server at http://127\.0\.0\.1:{server.port}/"
        assert re.search(started, log)
        assert "async_handler" not in log


def test_port_in_use(site: MontageSite, server: RunserverProcess) -> None:
    second = RunserverProcess(site, ["--noreload"], port=server.port)
    try:
        second.start(wait=False)
        assert second.wait_exit(60.0) == 1
        assert "Error: That port is already in use." in second.log_text()
    finally:
        second.cleanup()
    # The first server is unaffected.
    assert httpx.get(server.url + "/request-info/").status_code == 200


def test_threads_option_is_validated(site: MontageSite) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "runserver", "--threads", "0", "--noreload"],
        cwd=site.project,
        env=site.process_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--threads: must be a positive integer, got 0" in result.stderr


def _free_ipv6_port() -> int | None:
    """A free port on ``::1``, or None when there is no IPv6 loopback."""
    if not socket.has_ipv6:
        return None
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
            port: int = sock.getsockname()[1]
            return port
    except OSError:
        return None


def test_ipv6(site: MontageSite) -> None:
    port = _free_ipv6_port()
    if port is None:
        pytest.skip("SKIPPED, NOT TESTED: no IPv6 loopback (::1) in this environment")
    server = RunserverProcess(
        site, ["-6", "--noreload", f"[::1]:{port}"], host="::1", port=port, addrport=False
    )
    with server:
        info = httpx.get(server.url + "/request-info/").json()
        assert info["remote_addr"] == "::1"
        assert info["host"] == f"[::1]:{port}"
        assert f"Starting development server at http://[::1]:{port}/" in server.log_text()


def test_plain_wsgi_application_runs_on_the_thread_pool(site: MontageSite) -> None:
    # A project whose WSGI_APPLICATION is Django's own WSGIHandler: the server cannot await
    # it, so each request holds one of the --threads threads for its whole duration.
    (site.project / "montage" / "settings_plain.py").write_text(
        "from montage.settings import *  # noqa: F403\n\nWSGI_APPLICATION = None\n"
    )
    server = site.runserver(
        "--noreload", "--threads", "2", env={"DJANGO_SETTINGS_MODULE": "montage.settings_plain"}
    )
    with server:
        assert "it is not an AsyncDjangoApplication" in server.log_text()
        started = time.monotonic()
        responses = asyncio.run(_concurrent_gets(server.url + "/hello/", 4))
        elapsed = time.monotonic() - started
        assert {r.text for r in responses} == {"Hello, world"}
        assert elapsed >= 1.9, f"4 requests on 2 threads took only {elapsed:.2f}s"
        assert httpx.get(server.url + "/static/gallery/style.css").status_code == 200


def test_control_c_stops_promptly_with_a_stream_open(site: MontageSite) -> None:
    server = RunserverProcess(site, ["--noreload"])
    with server:
        with httpx.stream(
            "GET", server.url + "/events/stream/?count=100&interval=0.2", timeout=10.0
        ) as stream:
            chunks = stream.iter_raw()
            assert b"event: tick" in next(chunks)
            assert server.proc is not None
            started = time.monotonic()
            server.proc.send_signal(signal.SIGINT)
            returncode = server.wait_exit(10.0)
            elapsed = time.monotonic() - started
        assert returncode == 0, server.log_text()
        # One second of grace for requests in flight, then the stream is dropped.
        assert elapsed < 4.0, f"runserver took {elapsed:.2f}s to stop"
        assert "Traceback" not in server.log_text()


def test_system_check_warns_when_staticfiles_shadows_runserver(site: MontageSite) -> None:
    (site.project / "montage" / "settings_order.py").write_text(
        "from montage.settings import *  # noqa: F403\n\n"
        "INSTALLED_APPS = [a for a in INSTALLED_APPS if a != 'async_handler']  # noqa: F405\n"
        "INSTALLED_APPS.append('async_handler')\n"
    )
    shadowed = site.manage("check", env={"DJANGO_SETTINGS_MODULE": "montage.settings_order"})
    assert "(async_handler.W001)" in shadowed.stderr
    assert "Move 'async_handler' above 'django.contrib.staticfiles'" in shadowed.stderr
    assert "(async_handler.W001)" not in site.manage("check").stderr
