"""Groups and broadcast for WebSocket views: in memory, or through a Django Channels layer.

Contract (the ``WebSocket`` class codes against this):

* A :class:`Member` is anything with ``deliver(message)`` and ``overflow()``.  Both are called
  on the event loop that entered :func:`membership`; neither may block or raise.
* :func:`membership` joins ``member`` to ``group`` on enter and leaves on exit, error or
  cancellation.  It owns a bounded queue of ``queue_size`` messages for the member and one
  pump task that takes from it and calls ``member.deliver(message)`` in broadcast order.
  When that queue is full, ``member.overflow()`` is called once (the member closes with 1013,
  Try Again Later, and logs) and nothing more is delivered to it: never a silent skip.
* With ``CHANNEL_LAYERS`` configured, each membership gets its own layer channel
  (``new_channel()``) added to the group, and a receive task pulls from the layer promptly
  into the bounded queue, because channels_redis's per-channel ``capacity`` drops messages
  silently when full (django/channels_redis#62, #83).
* Layer messages have ``type`` ``"async_handler.broadcast"`` (a Channels consumer handles it
  in ``async_handler_broadcast``) and carry ``"text"`` (str) or ``"bytes"`` (bytes).  Any
  ``group_send`` message carrying ``text`` or ``bytes`` is delivered to our members.
* At most :data:`LAYER_CONCURRENCY` layer calls (``group_add``, ``group_discard``,
  ``group_send``) are in flight per event loop; the others wait their turn.
* Without a layer, groups live in this process only (see check ``async_handler.W003``).
  channels is imported lazily, only when ``CHANNEL_LAYERS`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import weakref
from collections.abc import AsyncIterator
from typing import Any, Protocol

from asgiref.sync import async_to_sync

__all__ = ["MESSAGE_TYPE", "Member", "broadcast", "broadcast_sync", "membership"]

logger = logging.getLogger("async_handler.websocket")

MESSAGE_TYPE = "async_handler.broadcast"
DEFAULT_QUEUE_SIZE = 64

#: Layer calls in flight per event loop.  channels_redis takes a pooled Redis connection per
#: call, and redis-py's asyncio pool (max_connections defaults to 100 in redis-py 8) raises
#: MaxConnectionsError instead of waiting when they are all taken: a burst of a few hundred
#: handshakes joining groups on one worker failed in the views.  Below the pool size, with
#: room left for the layer's own receive loop.
LAYER_CONCURRENCY = 32

_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def _gate() -> asyncio.Semaphore:
    # One per loop: a semaphore belongs to the loop it first waits on, and broadcast_sync runs
    # on async_to_sync's loops.
    loop = asyncio.get_running_loop()
    gate = _gates.get(loop)
    if gate is None:
        gate = _gates[loop] = asyncio.Semaphore(LAYER_CONCURRENCY)
    return gate


# Channels' own rule for group names (channels.layers.BaseChannelLayer.group_name_regex).
_GROUP_NAME = re.compile(r"^[a-zA-Z0-9\-_.]{1,99}$")


class Member(Protocol):
    """What a group delivers to: called on the loop; must not block; raises nothing."""

    def deliver(self, message: str | bytes) -> None: ...

    def overflow(self) -> None: ...


def _check_group(group: str) -> None:
    if not isinstance(group, str) or not _GROUP_NAME.match(group):
        raise ValueError(
            f"Invalid group name {group!r}: use 1-99 ASCII letters, digits, '-', '_' or '.'"
        )


def _check_message(message: str | bytes) -> None:
    if not isinstance(message, (str, bytes)):
        raise TypeError(f"broadcast message must be str or bytes, not {type(message).__name__}")


def _layer() -> Any:
    """The default Channels layer, or None when ``CHANNEL_LAYERS`` is not configured."""
    from django.conf import settings

    if not getattr(settings, "CHANNEL_LAYERS", None):
        return None
    # Lazy: channels is the [redis] extra. Ignore: channels ships no stubs.
    from channels.layers import get_channel_layer

    return get_channel_layer()


class _Slot:
    """One member's bounded queue; ``offer`` never blocks."""

    def __init__(self, member: Member, queue_size: int) -> None:
        self.member = member
        self.queue: asyncio.Queue[str | bytes] = asyncio.Queue(queue_size)
        self.overflowed = False
        self.loop = asyncio.get_running_loop()

    def offer(self, message: str | bytes) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.overflowed = True
            logger.warning("group member %r cannot keep up: closing it (1013)", self.member)
            self.member.overflow()

    async def pump(self) -> None:
        while True:
            message = await self.queue.get()
            if self.overflowed:
                return
            self.member.deliver(message)


# In-memory groups: group name -> slots in this process (loop-affine, like the sockets).
_local: dict[str, set[_Slot]] = {}


def _offer_local(group: str, message: str | bytes) -> None:
    # A slot belongs to the loop that joined; asyncio.Queue is not thread-safe, so a sender on
    # another loop or thread hands the offer to that loop instead of touching the queue.
    try:
        current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        current = None
    for slot in list(_local.get(group, ())):
        if slot.loop is current:
            slot.offer(message)
        else:
            slot.loop.call_soon_threadsafe(slot.offer, message)


def _to_layer_message(message: str | bytes) -> dict[str, Any]:
    key = "bytes" if isinstance(message, bytes) else "text"
    return {"type": MESSAGE_TYPE, key: message}


async def broadcast(group: str, message: str | bytes) -> None:
    """Send ``message`` to every member of ``group`` on every worker sharing the layer."""
    _check_group(group)
    _check_message(message)
    layer = _layer()
    if layer is None:
        _offer_local(group, message)
        return
    async with _gate():
        await layer.group_send(group, _to_layer_message(message))


def broadcast_sync(group: str, message: str | bytes) -> None:
    """:func:`broadcast` for sync code on any thread (async_to_sync finds or makes a loop)."""
    _check_group(group)
    _check_message(message)
    if _layer() is None:
        _offer_local(group, message)
        return
    async_to_sync(broadcast)(group, message)


async def _receive(layer: Any, channel: str, slot: _Slot) -> None:
    while True:
        event = await layer.receive(channel)
        if "text" in event and event["text"] is not None:
            slot.offer(event["text"])
        elif "bytes" in event and event["bytes"] is not None:
            slot.offer(event["bytes"])


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and return once they are done.

    Cancelled again while they are not: a channels_redis ``receive()`` cancelled while a
    message sent to its channel is arriving was seen to lose the cancellation and block in a
    new ``BZPOPMIN`` for ``brpop_timeout`` (5 s; channels_redis 4.3, redis-py 8), holding a
    closed socket's request that long.
    """
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.05)


async def _discard(layer: Any, group: str, channel: str) -> None:
    async with _gate():
        await layer.group_discard(group, channel)


@contextlib.asynccontextmanager
async def membership(
    group: str, member: Member, *, queue_size: int = DEFAULT_QUEUE_SIZE
) -> AsyncIterator[None]:
    """Join ``member`` to ``group`` for the body; leave on exit, error or cancellation."""
    _check_group(group)
    if queue_size < 1:
        raise ValueError("queue_size must be at least 1")
    slot = _Slot(member, queue_size)
    tasks = [asyncio.create_task(slot.pump())]
    layer = _layer()
    channel = None
    try:
        if layer is None:
            _local.setdefault(group, set()).add(slot)
        else:
            channel = await layer.new_channel()
            async with _gate():
                await layer.group_add(group, channel)
            tasks.append(asyncio.create_task(_receive(layer, channel, slot)))
        yield
    finally:
        if layer is None:
            members = _local.get(group)
            if members is not None:
                members.discard(slot)
                if not members:
                    del _local[group]
        await _stop(tasks)
        if layer is not None and channel is not None:
            # Shielded: a cancelled view must still leave the group, or the layer keeps
            # sending to a dead channel until the group expiry.
            await asyncio.shield(_discard(layer, group, channel))
