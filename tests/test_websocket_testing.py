"""``async_handler.websocket.testing.WebSocketClient``: WebSocket views tested in process.

Every handshake goes through the test project's whole middleware stack (an async-only
middleware, startproject's seven, a sync-only one, a hook-style one) in the real
``AsyncDjangoApplication``; logins come from Django's own test client on a test database made
by Django's test machinery (``setup_databases``).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from websockets.exceptions import ProtocolError

from async_handler.contract import WebSocketDisconnect
from async_handler.websocket.testing import SAME_ORIGIN as SAME


@pytest.fixture(scope="module")
def database(django_project):
    from django.test.utils import setup_databases, teardown_databases

    config = setup_databases(verbosity=0, interactive=False, aliases={"default"})
    yield
    teardown_databases(config, verbosity=0)


@pytest.fixture
def user(database):
    from django.contrib.auth.models import User

    name = f"ws-{uuid.uuid4().hex[:8]}"
    return User.objects.create_user(name, password="not-used-here")


@pytest.fixture
def events(django_project):
    from tests.djproject.views import EVENTS

    EVENTS.clear()
    return EVENTS


def run(coro):
    """Run ``coro`` on a fresh loop and check that it left no task behind."""

    async def checked():
        result = await coro
        # The client's own tasks, the view's, its group pumps: all done by now.
        leftover = asyncio.all_tasks() - {asyncio.current_task()}
        assert not leftover, leftover
        return result

    return asyncio.run(checked())


def client_for(path, **kwargs):
    from async_handler.websocket.testing import WebSocketClient

    return WebSocketClient(path, **kwargs)


def test_echo_text_and_binary_through_the_middleware(django_project):
    async def main():
        async with client_for("/ws/echo/") as ws:
            await ws.send("hello")
            assert await ws.receive() == "hello"
            await ws.send(b"\x00\xff")
            assert await ws.receive() == b"\x00\xff"
            assert await ws.receive_nothing(0.05)
            headers = ws.response
            assert headers.status_code == 101
            # Set on the 101 by the async-only, the sync-only, a hook-style and Django's
            # clickjacking middleware; the server's handshake fields are there too.
            assert headers["X-Async-MW"] == "1"
            assert headers["X-Sync-MW"] == "1"
            assert headers["X-Hook"] == "1"
            assert headers["X-Frame-Options"] == "DENY"
            assert headers["Upgrade"] == "websocket"
            assert "Sec-WebSocket-Accept" in headers
            assert "Content-Type" not in headers
        assert ws.close_code == 1000

    run(main())


def test_json_and_query_string(django_project):
    async def main():
        async with client_for("/wstest/json/?q=find+me") as ws:
            await ws.send_json({"n": [1, 2]})
            assert await ws.receive_json() == {
                "got": {"n": [1, 2]},
                "user": None,
                "query": "find me",
            }

    run(main())


def test_force_login_reaches_request_user_and_the_session_cookie_comes_back(user):
    from django.test import Client

    client = Client()
    client.force_login(user)

    async def main():
        async with client_for("/ws/whoami/", client=client, subprotocols=["chat.v1"]) as ws:
            hello = await ws.receive_json()
            # SessionMiddleware saved the view's session change on the 101.
            cookies = ws.response.get_all("Set-Cookie")
            assert any(c.startswith("sessionid=") for c in cookies), cookies
            assert ws.response["X-WS-View"] == "whoami"
        async with client_for("/ws/whoami/", client=client) as again:
            second = await again.receive_json()
        return hello, second

    hello, second = run(main())
    assert hello["user"] == user.username
    assert hello["subprotocol"] == "chat.v1"
    assert (hello["visits"], second["visits"]) == (1, 2)
    assert second["subprotocol"] is None
    # The test client follows the 101's cookies: plain HTTP requests share the session.
    assert client.session["ws_visits"] == 2


def test_async_client_login_works_too(user):
    from asgiref.sync import async_to_sync
    from django.test import AsyncClient

    client = AsyncClient()
    async_to_sync(client.aforce_login)(user)

    async def main():
        async with client_for("/wstest/json/", client=client) as ws:
            await ws.send_json(1)
            return await ws.receive_json()

    assert run(main())["user"] == user.username


def test_anonymous_handshake_gets_the_views_403(database):
    from async_handler.websocket.testing import HandshakeRejected

    async def main():
        with pytest.raises(HandshakeRejected) as refused:
            async with client_for("/ws/whoami/"):
                pass
        return refused.value

    refused = run(main())
    assert refused.status_code == 403
    assert refused.response.content == b"login required"
    assert refused.response["X-Async-MW"] == "1"
    assert "403" in str(refused)


def test_cross_origin_is_refused_before_the_view_and_no_origin_is_allowed(django_project, events):
    from async_handler.websocket.testing import HandshakeRejected

    async def main():
        with pytest.raises(HandshakeRejected) as refused:
            await client_for("/ws/probe/evil/", origin="http://evil.example").connect()
        assert refused.value.status_code == 403
        async with client_for("/ws/probe/none/", origin=None) as ws:  # not a browser
            await ws.send("x")
            assert await ws.receive() == "x"
        async with client_for("/ws/probe/secure/", secure=True) as ws:  # https://testserver
            await ws.send("y")
            assert await ws.receive() == "y"

    run(main())
    assert "ws started evil" not in events
    assert "ws ended none" in events
    assert "ws ended secure" in events


def test_middleware_short_circuit_is_a_rejection(django_project):
    from async_handler.websocket.testing import HandshakeRejected

    async def main():
        with pytest.raises(HandshakeRejected) as refused:
            await client_for("/ws/echo/", headers={"X-Short-Circuit": "sync_mw"}).connect()
        return refused.value.response

    response = run(main())
    assert (response.status_code, response.content) == (299, b"short-circuit by sync_mw")


@pytest.mark.parametrize(
    ("offered", "query", "chosen"),
    [
        (["chat.v1", "chat.v2"], "", "chat.v1"),  # the client's order decides
        (["other", "chat.v2"], "", "chat.v2"),
        (["other"], "", None),
        (["chat.v1", "chat.v2"], "?pick=chat.v2", "chat.v2"),
    ],
)
def test_subprotocol_negotiation(django_project, offered, query, chosen):
    async def main():
        async with client_for(f"/wstest/negotiate/{query}", subprotocols=offered) as ws:
            assert ws.subprotocol == chosen
            assert ws.response.get("Sec-WebSocket-Protocol") == chosen
            assert await ws.receive() == (chosen or "none")

    run(main())


def test_picking_a_subprotocol_not_offered_is_the_views_error(django_project):
    async def main():
        with pytest.raises(ValueError, match="not offered"):
            await client_for("/wstest/negotiate/?pick=chat.v2", subprotocols=["chat.v1"]).connect()

    run(main())


def test_close_codes_both_ways(django_project, events):
    async def main():
        async with client_for("/wstest/close/4001/") as ws:
            with pytest.raises(WebSocketDisconnect) as closed:
                await ws.receive()
            assert (closed.value.code, closed.value.reason) == (4001, "bye")
            assert (ws.close_code, ws.close_reason) == (4001, "bye")
            with pytest.raises(WebSocketDisconnect):
                await ws.send("too late")

        ws = client_for("/wstest/record-close/mine/")
        with pytest.raises(RuntimeError, match="not connected"):
            await ws.send("early")
        await ws.connect()
        await ws.send("ping")
        assert await ws.receive() == "ping"
        with pytest.raises(ProtocolError):  # 1006 is never sent on the wire (RFC 6455 7.4.1)
            await ws.close(1006)
        await ws.close(4321, "done here")
        assert ws.close_code == 4321  # the view's echo of our close frame

    run(main())
    assert "closed mine 4321 done here" in events


def test_view_error_after_accept_is_raised_and_closes_1011(django_project):
    async def main():
        async with client_for("/ws/raise/after/") as ws:
            await ws.send("go")
            with pytest.raises(ValueError, match="raised after accept"):
                await ws.receive()
            assert ws.close_code == 1011

        async with client_for("/ws/raise/after/", raise_request_exception=False) as ws:
            await ws.send("go")
            with pytest.raises(WebSocketDisconnect) as closed:
                await ws.receive()
            assert closed.value.code == 1011

    run(main())


def test_view_error_before_accept_is_raised_or_is_the_500(django_project):
    from async_handler.websocket.testing import HandshakeRejected

    async def main():
        with pytest.raises(ValueError, match="raised before accept"):
            await client_for("/ws/raise/before/").connect()
        with pytest.raises(HandshakeRejected) as refused:
            await client_for("/ws/raise/before/", raise_request_exception=False).connect()
        return refused.value.response

    response = run(main())
    assert (response.status_code, response.content) == (500, b"custom 500")


def test_drop_cancels_a_view_that_is_not_reading(django_project, events):
    async def main():
        async with client_for("/wstest/deaf/gone/") as ws:
            assert await ws.receive() == "tick"
            await ws.drop()
            assert ws.close_code == 1006
            with pytest.raises(WebSocketDisconnect) as closed:
                await ws.send("anyone?")
            assert closed.value.code == 1006

    run(main())
    assert "deaf cancelled gone" in events


def test_close_waits_for_the_view_then_cancels_one_that_ignores_it(django_project, events):
    async def main():
        # Sending after the close fails in the view: it returns by itself.
        async with client_for("/wstest/deaf/polite/") as ws:
            assert await ws.receive() == "tick"
        # This one sleeps through the close: the server would give it FINISH_GRACE seconds.
        ws = client_for("/wstest/deaf/asleep/?quiet=1")
        await ws.connect()
        with pytest.raises(TimeoutError, match="still running"):
            await ws.close(timeout=0.2)

    run(main())
    assert "deaf disconnected polite 1000" in events
    assert "deaf cancelled asleep" in events


def test_handshake_timeout_abandons_the_request(django_project, events):
    async def main():
        with pytest.raises(TimeoutError, match="no answer"):
            await client_for("/wstest/hesitate/slow/").connect(timeout=0.2)

    run(main())
    assert events == ["hesitate started slow", "hesitate cancelled slow"]


def test_broadcast_between_two_clients_in_memory(django_project):
    from django.test import override_settings

    room = f"r{uuid.uuid4().hex[:8]}"

    async def main():
        async with (
            client_for(f"/ws/chat/{room}/") as alice,
            client_for(f"/ws/chat/{room}/") as bob,
        ):
            assert await alice.receive() == "joined"
            assert await bob.receive() == "joined"
            await alice.send("hi bob")
            assert await bob.receive() == "hi bob"
            assert await alice.receive() == "hi bob"  # the group includes the sender
            await bob.send("hi alice")
            assert await alice.receive() == "hi alice"
            assert await bob.receive() == "hi alice"
            assert await alice.receive_nothing(0.05)

    with override_settings(CHANNEL_LAYERS={}):
        run(main())
    from async_handler.websocket.groups import _local

    assert f"chat.{room}" not in _local


def test_exit_after_a_failing_block_keeps_the_blocks_error(django_project):
    async def main():
        with pytest.raises(AssertionError, match="the test's own"):
            async with client_for("/ws/echo/"):
                raise AssertionError("the test's own")

    run(main())


@pytest.fixture(scope="module")
def real_server():
    from tests.server import GunicornServer

    with GunicornServer(
        "tests.djproject.wsgi:application", args=["--threads", "2"], ready_path="/async/hello/"
    ) as server:
        yield server


async def _real(server, path, *, origin=None, send=None):
    """What the websockets client sees from the real worker: (status, headers, body) for a
    refusal, or (101, headers, close code, close reason) after sending ``send``."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    try:
        async with connect(f"ws://{server.host}:{server.port}{path}", origin=origin) as ws:
            headers = {name.lower() for name in ws.response.headers}
            if send is not None:
                await ws.send(send)
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.recv()
            return 101, headers, ws.close_code, ws.close_reason
    except InvalidStatus as refused:
        response = refused.response
        return response.status_code, None, bytes(response.body), None


async def _in_process(path, *, origin, send=None):
    from async_handler.websocket.testing import HandshakeRejected

    ws = client_for(path, origin=origin, raise_request_exception=False)
    try:
        await ws.connect()
    except HandshakeRejected as refused:
        return refused.status_code, None, refused.response.content, None
    headers = {name.lower() for name, _ in ws.response.headers}
    if send is not None:
        await ws.send(send)
    with pytest.raises(WebSocketDisconnect):
        while True:
            await ws.receive()
    await ws.close()
    return 101, headers, ws.close_code, ws.close_reason


@pytest.mark.parametrize(
    ("path", "cross_site", "send"),
    [
        ("/wstest/close/4001/", False, None),
        ("/ws/raise/after/", False, "go"),
        ("/ws/whoami/", False, None),
        ("/ws/probe/evil/", True, None),
        ("/ws/echo/?ignored=1", True, None),
    ],
)
def test_same_answers_as_the_real_worker(real_server, database, path, cross_site, send):
    # The in-process client must see what a browser sees from gunicorn: statuses, bodies,
    # close codes and reasons, and the 101's fields (less those the real server adds for
    # itself: Date, Server, the permessage-deflate offer it accepted).
    origin = "http://evil.example" if cross_site else real_server.url
    real = asyncio.run(_real(real_server, path, origin=origin, send=send))
    ours = run(_in_process(path, origin=origin if cross_site else SAME, send=send))
    if real[1] is not None:
        real = (real[0], real[1] - {"date", "server", "sec-websocket-extensions"}, *real[2:])
    assert ours == real
