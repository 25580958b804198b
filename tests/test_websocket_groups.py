"""Groups and broadcast (async_handler.websocket.groups): in memory and on channels_redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import uuid

import pytest

from tests._support import REDIS, REPO_ROOT, flush_redis_prefix, require_redis

PREFIX = f"ah-test-{uuid.uuid4().hex[:8]}"


class FakeMember:
    def __init__(self) -> None:
        self.got: list[str | bytes] = []
        self.overflowed = 0

    def deliver(self, message: str | bytes) -> None:
        self.got.append(message)

    def overflow(self) -> None:
        self.overflowed += 1


def _redis_layers() -> dict:
    return {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS], "prefix": PREFIX},
        }
    }


@pytest.fixture(params=["memory", "redis"])
def mode(request, django_project):
    yield from _mode(request.param)


@pytest.fixture
def memory_mode(django_project):
    yield from _mode("memory")


@pytest.fixture
def redis_mode(django_project):
    yield from _mode("redis")


def _mode(name):
    from django.test import override_settings

    if name == "memory":
        with override_settings(CHANNEL_LAYERS={}):
            yield "memory"
        return
    require_redis()
    from channels import layers

    with override_settings(CHANNEL_LAYERS=_redis_layers()):
        layers.channel_layers.backends.clear()
        try:
            yield "redis"
        finally:
            layers.channel_layers.backends.clear()
            flush_redis_prefix(PREFIX)


async def _settle(mode: str, members: list[FakeMember], count: int) -> None:
    for _ in range(200):
        if all(len(m.got) >= count for m in members):
            return
        await asyncio.sleep(0.01 if mode == "memory" else 0.02)


def run(coro):
    return asyncio.run(coro)


def test_bad_group_name_raises_naming_it(mode):
    from async_handler.websocket.groups import broadcast, membership

    with pytest.raises(ValueError, match="room 1"):
        run(broadcast("room 1", "x"))

    async def join():
        async with membership("é", FakeMember()):
            pass

    with pytest.raises(ValueError, match="'é'"):
        run(join())


def test_exactly_once_to_n_members_str_and_bytes(mode):
    from async_handler.websocket.groups import broadcast, membership

    group = f"g.{uuid.uuid4().hex}"
    members = [FakeMember() for _ in range(5)]

    async def main():
        async with (
            membership(group, members[0]),
            membership(group, members[1]),
            membership(group, members[2]),
            membership(group, members[3]),
            membership(group, members[4]),
        ):
            await broadcast(group, "hello")
            await broadcast(group, b"\x00bin")
            await _settle(mode, members, 2)
            await asyncio.sleep(0.1)

    run(main())
    for m in members:
        assert m.got == ["hello", b"\x00bin"]
        assert m.overflowed == 0


def test_leave_on_exception_and_cancellation(mode):
    from async_handler.websocket.groups import _local, broadcast, membership

    group = f"g.{uuid.uuid4().hex}"
    left, stayed = FakeMember(), FakeMember()

    async def main():
        with pytest.raises(RuntimeError):
            async with membership(group, left):
                raise RuntimeError("boom")

        async def forever():
            async with membership(group, left):
                await asyncio.sleep(3600)

        task = asyncio.create_task(forever())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with membership(group, stayed):
            await broadcast(group, "after")
            await _settle(mode, [stayed], 1)
            await asyncio.sleep(0.1)

    run(main())
    assert left.got == []
    assert stayed.got == ["after"]
    assert group not in _local


def test_full_member_overflows_others_get_everything(memory_mode):
    # In memory only: the queue can be filled by offers with no await between them; on a
    # layer the same _Slot code runs, fed by the receive task.
    mode = memory_mode
    from async_handler.websocket.groups import broadcast, membership

    group = f"g.{uuid.uuid4().hex}"
    slow, fast = FakeMember(), FakeMember()

    async def main():
        async with membership(group, slow, queue_size=2), membership(group, fast, queue_size=100):
            # No await between in-memory offers: the pumps cannot run, so slow's queue fills.
            for i in range(5):
                await broadcast(group, str(i))
            await _settle(mode, [fast], 5)
            await asyncio.sleep(0.1)

    run(main())
    assert fast.got == [str(i) for i in range(5)]
    assert slow.overflowed == 1
    assert slow.got == []


def test_broadcast_sync_from_thread_and_sync_to_async(mode):
    from asgiref.sync import sync_to_async

    from async_handler.websocket.groups import broadcast_sync, membership

    group = f"g.{uuid.uuid4().hex}"
    member = FakeMember()

    async def main():
        async with membership(group, member):
            thread = threading.Thread(target=broadcast_sync, args=(group, "thread"))
            thread.start()
            await asyncio.to_thread(thread.join)
            await _settle(mode, [member], 1)
            await sync_to_async(broadcast_sync)(group, b"pool")
            await _settle(mode, [member], 2)
            await asyncio.sleep(0.1)

    run(main())
    assert member.got == ["thread", b"pool"]


def test_cross_process_broadcast(redis_mode):
    mode = redis_mode
    from async_handler.websocket.groups import membership

    group = f"g.{uuid.uuid4().hex}"
    member = FakeMember()
    script = (
        "from django.conf import settings; import django;"
        f"settings.configure(CHANNEL_LAYERS={_redis_layers()!r}); django.setup();"
        "from async_handler.websocket.groups import broadcast_sync;"
        f"broadcast_sync({group!r}, 'from another process')"
    )

    async def main():
        async with membership(group, member):
            env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, env=env)
            assert await proc.wait() == 0
            await _settle(mode, [member], 1)

    run(main())
    assert member.got == ["from another process"]


def test_channels_interop_message_shape(redis_mode):
    mode = redis_mode
    from channels.layers import get_channel_layer

    from async_handler.websocket.groups import broadcast, membership

    group = f"g.{uuid.uuid4().hex}"
    member = FakeMember()

    async def main():
        layer = get_channel_layer()
        consumer_channel = await layer.new_channel()
        await layer.group_add(group, consumer_channel)
        async with membership(group, member):
            await broadcast(group, "ours")
            event = await asyncio.wait_for(layer.receive(consumer_channel), 5)
            # A Channels consumer's group_send, as AsyncWebsocketConsumer code would do it.
            await layer.group_send(group, {"type": "chat.message", "text": "theirs"})
            await _settle(mode, [member], 2)
        await layer.group_discard(group, consumer_channel)
        return event

    event = run(main())
    assert event == {"type": "async_handler.broadcast", "text": "ours"}
    assert member.got == ["ours", "theirs"]


def test_no_channels_import_without_a_layer():
    # The [redis] extra is optional: importing and using groups in memory must not need it.
    script = (
        "import sys, asyncio; from django.conf import settings; import django;"
        "settings.configure(); django.setup();"
        "from async_handler.websocket import groups;"
        "asyncio.run(groups.broadcast('g', 'x'));"
        "assert not any(m.split('.')[0] in ('channels', 'channels_redis') for m in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)


def test_ready_registers_w003(django_project):
    from django.core import checks

    import async_handler
    from async_handler.apps import AsyncHandlerConfig, check_in_memory_groups

    registry = checks.registry.registry
    before = set(registry.registered_checks)
    try:
        AsyncHandlerConfig("async_handler", async_handler).ready()
        assert check_in_memory_groups in registry.get_checks()
    finally:
        registry.registered_checks = before


def test_leaving_right_after_a_broadcast_is_prompt(redis_mode):
    # A socket that sends to its own group and closes at once (a chat's "left" message) used
    # to keep its request for channels_redis's brpop_timeout (5 s): the receive task lost its
    # cancellation while the message was arriving.
    import time

    from async_handler.websocket.groups import broadcast, membership

    group = f"g.{uuid.uuid4().hex}"
    exits = []

    async def main():
        for _ in range(3):
            async with membership(group, FakeMember()):
                await asyncio.sleep(0.05)
                await broadcast(group, "bye")
                started = time.monotonic()
            exits.append(time.monotonic() - started)

    run(main())
    assert max(exits) < 2.5, exits


def test_hundreds_join_at_once_on_a_layer(redis_mode):
    # A burst of handshakes on one worker: more concurrent group_add calls than redis-py's
    # connection pool holds (100) must wait their turn, not fail with MaxConnectionsError.
    mode = redis_mode
    from async_handler.websocket.groups import broadcast, membership

    group = f"g.{uuid.uuid4().hex}"
    members = [FakeMember() for _ in range(300)]
    joined = asyncio.Event()
    count = 0

    async def member(m: FakeMember) -> None:
        nonlocal count
        async with membership(group, m):
            count += 1
            if count == len(members):
                joined.set()
            await asyncio.sleep(3600)

    async def main():
        tasks = [asyncio.create_task(member(m)) for m in members]
        waiter = asyncio.ensure_future(joined.wait())
        try:
            await asyncio.wait([waiter, *tasks], timeout=30, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                if task.done():
                    task.result()  # raises what made a membership fail
            assert joined.is_set(), f"{count} of {len(members)} joined"
            await broadcast(group, "all")
            await _settle(mode, members, 1)
        finally:
            waiter.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(waiter, *tasks, return_exceptions=True)

    run(main())
    assert all(m.got == ["all"] for m in members)


@pytest.mark.parametrize("value", [0, -1, "8", True, 2.5])
def test_outbox_size_setting_must_be_a_positive_integer(django_project, value):
    from django.core.exceptions import ImproperlyConfigured
    from django.test import override_settings

    from async_handler.websocket import OUTBOX_SIZE, _outbox_size

    assert _outbox_size() == OUTBOX_SIZE
    with override_settings(ASYNC_HANDLER_WS_OUTBOX_SIZE=8):
        assert _outbox_size() == 8
    with (
        override_settings(ASYNC_HANDLER_WS_OUTBOX_SIZE=value),
        pytest.raises(ImproperlyConfigured, match="ASYNC_HANDLER_WS_OUTBOX_SIZE"),
    ):
        _outbox_size()


@pytest.mark.parametrize("value", [-1, "8", True, 3600, None])
def test_finish_grace_setting_must_be_seconds(django_project, value):
    from django.core.exceptions import ImproperlyConfigured
    from django.test import override_settings

    from async_handler.websocket import FINISH_GRACE, _finish_grace

    assert _finish_grace() == FINISH_GRACE
    with override_settings(ASYNC_HANDLER_WS_FINISH_GRACE=0):
        assert _finish_grace() == 0.0
    with override_settings(ASYNC_HANDLER_WS_FINISH_GRACE=2.5):
        assert _finish_grace() == 2.5
    with (
        override_settings(ASYNC_HANDLER_WS_FINISH_GRACE=value),
        pytest.raises(ImproperlyConfigured, match="ASYNC_HANDLER_WS_FINISH_GRACE"),
    ):
        _finish_grace()
