"""A WebSocket handshake with a logged-in session, over real sockets, under gunicorn (issue 13).

The montage example has startproject's middleware and a migrated SQLite database.  A client
signs in through the login form (CSRF and all), then opens the chat's socket with the session
cookie: the view sees ``request.user``, writes the session before ``accept()``, and
SessionMiddleware saves it on the 101 as on any response, so the next HTTP page shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.montage_harness import MontageSite
from tests.server import GunicornServer

USER, PASSWORD = "carol", "s3cret-pass-for-carol"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    site = MontageSite(tmp_path_factory.mktemp("montage-ws-session"))
    site.migrate()
    site.create_superuser(USER, PASSWORD)
    with site.gunicorn() as server:
        yield server


def _login(server: GunicornServer) -> httpx.Client:
    client = httpx.Client(base_url=server.url, timeout=10)
    page = client.get("/chat/login/")
    assert page.status_code == 200
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert token is not None, page.text
    answer = client.post(
        "/chat/login/",
        data={"username": USER, "password": PASSWORD, "csrfmiddlewaretoken": token.group(1)},
        headers={"Referer": f"{server.url}/chat/login/"},
    )
    assert answer.status_code == 302, answer.text
    assert "sessionid" in client.cookies
    return client


def test_a_logged_in_handshake_reaches_the_view_and_its_session_is_saved(server):
    with contextlib.closing(_login(server)) as client:
        _check_session_round_trip(server, client)


def _check_session_round_trip(server: GunicornServer, client: httpx.Client) -> None:
    room = f"room-{uuid.uuid4().hex[:8]}"
    before = client.get("/chat/")
    assert before.status_code == 200 and 'id="last-room"' not in before.text
    cookie = "; ".join(f"{name}={value}" for name, value in client.cookies.items())

    async def main() -> tuple[dict, str | None]:
        async with connect(
            f"ws://{server.host}:{server.port}/chat/{room}/ws/",
            additional_headers={"Cookie": cookie, "Origin": server.url},
        ) as ws:
            welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
            return welcome, ws.response.headers.get("Set-Cookie")

    welcome, set_cookie = asyncio.run(main())
    # AuthenticationMiddleware ran on the handshake: the view knows who signed in.
    assert welcome["type"] == "welcome" and welcome["user"] == USER
    # SessionMiddleware saved the modified session on the 101 (and refreshed its cookie) ...
    assert set_cookie is not None and set_cookie.startswith("sessionid="), set_cookie
    # ... so a later HTTP request of the same session sees what the socket's view wrote.
    after = client.get("/chat/")
    assert after.status_code == 200
    assert re.search(rf'id="last-room">Back to <a href="/chat/{room}/">', after.text), after.text


def test_the_same_handshake_without_the_cookie_gets_the_views_403(server):
    async def main() -> None:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(
                f"ws://{server.host}:{server.port}/chat/lobby/ws/",
                additional_headers={"Origin": server.url},
            ):
                pass
        assert refused.value.response.status_code == 403
        assert refused.value.response.body == b"Sign in to chat."

    asyncio.run(main())
