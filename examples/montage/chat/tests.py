"""The chat room's tests, with async_handler's in-process WebSocket client.

Run them with ``python manage.py test chat``.  They are ``TransactionTestCase``s because the
socket's sync code (the session and user lookups of the handshake) runs on the application's
threads, whose database connections see committed data only.
"""

import uuid

from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.test import AsyncClient, TransactionTestCase

from async_handler.websocket import WebSocketDisconnect
from async_handler.websocket.testing import HandshakeRejected, WebSocketClient


def room() -> str:
    """A room of this test's own: with MONTAGE_REDIS_URL the groups are shared on Redis."""
    return f"test-{uuid.uuid4().hex[:12]}"


class ChatRoomTests(TransactionTestCase):
    async def signed_in(self, name: str) -> AsyncClient:
        user = await sync_to_async(User.objects.create_user)(name)  # no password: no hashing
        client = AsyncClient()
        await client.aforce_login(user)
        return client

    async def test_a_message_reaches_everyone_in_the_room(self) -> None:
        alice, bob = await self.signed_in("alice"), await self.signed_in("bob")
        lobby = room()
        async with (
            WebSocketClient(f"/chat/{lobby}/ws/", client=alice) as alice_ws,
            WebSocketClient(f"/chat/{lobby}/ws/", client=bob) as bob_ws,
        ):
            for ws, name in ((alice_ws, "alice"), (bob_ws, "bob")):
                welcome = await ws.receive_json()
                self.assertEqual((welcome["type"], welcome["user"]), ("welcome", name))
            self.assertEqual((await alice_ws.receive_json())["user"], "alice")  # own join
            self.assertEqual((await alice_ws.receive_json())["user"], "bob")  # bob's join
            self.assertEqual((await bob_ws.receive_json())["user"], "bob")
            await alice_ws.send("  hello, bob  ")
            for ws in (alice_ws, bob_ws):
                event = await ws.receive_json()
                self.assertEqual(
                    (event["type"], event["user"], event["text"]),
                    ("message", "alice", "hello, bob"),
                )
            await bob_ws.send("   ")  # blank: nothing is broadcast
            self.assertTrue(await alice_ws.receive_nothing(0.1))

    async def test_rooms_are_separate(self) -> None:
        alice, bob = await self.signed_in("alice"), await self.signed_in("bob")
        async with (
            WebSocketClient(f"/chat/{room()}/ws/", client=alice) as one,
            WebSocketClient(f"/chat/{room()}/ws/", client=bob) as two,
        ):
            await one.receive_json()  # welcome
            await one.receive_json()  # join
            await two.receive_json()
            await two.receive_json()
            await one.send("only for room one")
            self.assertEqual((await one.receive_json())["text"], "only for room one")
            self.assertTrue(await two.receive_nothing(0.1))

    async def test_anonymous_and_cross_site_handshakes_are_refused(self) -> None:
        with self.assertRaises(HandshakeRejected) as refused:
            await WebSocketClient("/chat/lobby/ws/").connect()
        self.assertEqual(refused.exception.status_code, 403)
        alice = await self.signed_in("alice")
        with self.assertRaises(HandshakeRejected) as refused:
            await WebSocketClient(
                "/chat/lobby/ws/", client=alice, origin="https://elsewhere.example"
            ).connect()
        self.assertEqual(refused.exception.status_code, 403)

    async def test_binary_and_oversized_messages_close_the_socket(self) -> None:
        alice = await self.signed_in("alice")
        for message, code in ((b"\x00", 1003), ("x" * 2001, 1009)):
            async with WebSocketClient(f"/chat/{room()}/ws/", client=alice) as ws:
                await ws.receive_json()
                await ws.receive_json()
                await ws.send(message)
                with self.assertRaises(WebSocketDisconnect) as closed:
                    while True:
                        await ws.receive()
                self.assertEqual(closed.exception.code, code)

    async def test_pages_need_a_login(self) -> None:
        response = await self.async_client.get("/chat/lobby/")
        self.assertRedirects(
            response, "/chat/login/?next=/chat/lobby/", fetch_redirect_response=False
        )
        alice = await self.signed_in("alice")
        response = await alice.get("/chat/lobby/")
        self.assertContains(response, "chat/chat.js")
