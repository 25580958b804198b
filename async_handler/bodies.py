"""The response bodies :class:`~async_handler.handler.AsyncDjangoApplication` returns: Django's
content and streaming responses as WSGI iterables or async iterators that close the response
(``request_finished``) exactly once, and the background loop that pulls an async stream for a
server without the contract.

Layer: Django glue (imports Django only for types), beside :mod:`async_handler.handler`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from django.http import HttpResponseBase

from ._hop import route_to
from .threads import CallerThreadExecutor, Lease


class _BackgroundLoop:
    """One event loop thread per process for the plain-WSGI fallback (no marker in the environ).

    asgiref's ``async_to_sync`` would create a loop and a thread for every call; an async
    streaming response pulled chunk by chunk needs one loop that outlives the call.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0

    def get(self) -> asyncio.AbstractEventLoop:
        """Return the running background loop, (re)starting it after a fork."""
        loop = self._loop
        if loop is not None and self._pid == os.getpid():
            return loop
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="async-handler-loop", daemon=True
                )
                thread.start()
                self._loop, self._pid = loop, os.getpid()
            return self._loop

    def run(self, executor: CallerThreadExecutor, coro: Awaitable[Any]) -> Any:
        """Run ``coro`` on the loop, serving its sync calls on the calling thread meanwhile."""
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(coro), self.get())
        return executor.run_until(future)


async def _as_coroutine(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


_background = _BackgroundLoop()


class _ContentBody(list[bytes]):
    """A complete body: a one-item list the server writes at once, with ``aclose()``."""

    # One per response, kept for the whole life of a WebSocket (the 101's body): a __dict__
    # for one attribute is 300 bytes.
    __slots__ = ("aclose",)

    def __init__(self, content: bytes, close: Callable[[], Awaitable[None]]) -> None:
        super().__init__((content,))
        self.aclose = close


async def _aclose_stream(response: HttpResponseBase, wrapper: AsyncIterator[bytes]) -> None:
    """Close an async streaming response's generators.

    ``streaming_content`` wraps the view's generator in one of Django's; closing the wrapper
    leaves the view's generator to the garbage collector, so its ``finally`` would run late,
    or never.  Close both, outer first.
    """
    try:
        aclose = getattr(wrapper, "aclose", None)
        if aclose is not None:
            await aclose()
    finally:
        inner = getattr(response, "_iterator", None)
        aclose = getattr(inner, "aclose", None)
        if aclose is not None:
            await aclose()


class _AsyncStream:
    """An async streaming response; each step runs with the request's thread affinity."""

    def __init__(
        self,
        response: HttpResponseBase,
        lease: Lease,
        close: Callable[[], Awaitable[None]],
    ) -> None:
        self._response = response
        self._iterator: AsyncIterator[bytes] = response.streaming_content  # type: ignore[attr-defined]
        self._lease = lease
        self._close = close

    def __aiter__(self) -> _AsyncStream:
        return self

    async def __anext__(self) -> bytes:
        # A fresh context per step: the server may pull from another task than the one that
        # called the application, and a sync_to_async inside the generator must still reach
        # this request's thread.
        with route_to(self._lease):
            return await self._iterator.__anext__()

    async def aclose(self) -> None:
        """Close the generators (so their ``finally`` runs), then the response."""
        try:
            with route_to(self._lease):
                await _aclose_stream(self._response, self._iterator)
        finally:
            await self._close()


class _SyncStream:
    """A sync streaming response pulled on the request's leased thread, never on the loop."""

    def __init__(
        self,
        iterator: Iterator[bytes],
        lease: Lease,
        close: Callable[[], Awaitable[None]],
    ) -> None:
        self._iterator = iterator
        self._lease = lease
        self._close = close

    def __aiter__(self) -> _SyncStream:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._lease.run(next, self._iterator, _END)
        if chunk is _END:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        """Close the iterator on its thread (a generator's ``finally`` may use the DB), then
        the response."""
        try:
            close = getattr(self._iterator, "close", None)
            if close is not None:
                await self._lease.run(close)
        finally:
            await self._close()


_END: Any = object()


class _BlockingAsyncStream:
    """A WSGI iterable over an async streaming response, for plain WSGI servers."""

    def __init__(self, response: HttpResponseBase, executor: CallerThreadExecutor) -> None:
        self._response = response
        self._executor = executor
        self._iterator: AsyncIterator[bytes] = response.streaming_content  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            chunk: bytes = _background.run(self._executor, self._step())
        except StopAsyncIteration:
            raise StopIteration from None
        return chunk

    async def _step(self) -> bytes:
        with route_to(self._executor):
            return await self._iterator.__anext__()

    def close(self) -> None:
        """PEP 3333 close: finish the generators on the loop, then close the response here."""
        try:
            _background.run(self._executor, self._aclose())
        finally:
            self._response.close()

    async def _aclose(self) -> None:
        with route_to(self._executor):
            await _aclose_stream(self._response, self._iterator)
