"""Sending response bodies: lists, iterables (on the request's thread), async iterables, and
``wsgi.file_wrapper`` files with ``loop.sendfile``, ``os.sendfile`` on uvloop, or a copy
(TLS, no ``sendfile``); :meth:`BodySender.drain` applies back-pressure and ``send_timeout``."""

from __future__ import annotations

import asyncio
import contextvars
import io
import os
import stat
from typing import TYPE_CHECKING, Any

from ..threads import Lease
from .response import ClientDisconnected, RequestCycle, _BrokenFraming

if TYPE_CHECKING:
    from .connection import HttpProtocol

#: Process-wide counters, updated only when the kernel's ``sendfile`` really sent a file body (not
#: when the copy fallback did), so that an application can report them in tests.
STATS: dict[str, int] = {"sendfile_calls": 0, "sendfile_bytes": 0}


class FileWrapper:
    """``wsgi.file_wrapper`` (PEP 3333): a file body the server may send with ``sendfile``.

    Iterating it reads ``blksize`` bytes at a time (the fallback for TLS, non-file objects or a
    loop without ``sendfile``).  Instances accept extra attributes, so an application may set an
    ``aclose`` coroutine function on one; the server then awaits it instead of calling
    :meth:`close`.
    """

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.blksize = blksize

    def __iter__(self) -> FileWrapper:
        return self

    def __next__(self) -> bytes:
        data: bytes = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration

    def close(self) -> None:
        """Close the wrapped file, if it can be closed."""
        close = getattr(self.filelike, "close", None)
        if close is not None:
            close()


_DONE = object()

#: Most bytes per ``os.sendfile`` call in :meth:`BodySender._sendfile_dup`, after which the loop
#: runs its other callbacks.  A client that keeps up (loopback) let one call send most of a 100 MB
#: file (~70 MB per call, ``perf stat``), holding the loop ~20 ms while every other connection
#: waited: ``/hello/`` on a fifth connection took 50 ms (p50) and 110-135 ms (p99) during
#: ``run.py``'s 4 downloads, against 16 ms and 30-43 ms with 4 MiB (under 1 ms of loop per call
#: at 5 GB/s, 25 loop turns per 100 MB); download GB/s unchanged (medians of 4 interleaved pairs
#: 4.5 vs 4.6), their p99 lower (the 4 files share the loop instead of taking turns).
SENDFILE_BLOCK = 4 * 1024 * 1024


def _next_chunk(iterator: Any) -> Any:
    try:
        return next(iterator)
    except StopIteration:
        return _DONE


class BodySender:
    """Body sending and back-pressure, mixed into the connection."""

    __slots__ = ()  # the connection declares them

    async def _send_body(  # type: ignore[misc]
        self: HttpProtocol, cycle: RequestCycle, body: Any, lease: Lease | None
    ) -> None:
        if isinstance(body, (list, tuple)):
            for chunk in body:
                if not isinstance(chunk, bytes):
                    raise TypeError(f"response body items must be bytes, not {type(chunk)}")
            cycle.emit(body[0] if len(body) == 1 else b"".join(body), final=True)
            await self.drain()
            return
        if isinstance(body, FileWrapper) and await self._send_file(cycle, body, lease):
            return
        if hasattr(body, "__aiter__"):
            async for chunk in body:
                if not isinstance(chunk, (bytes, bytearray)):
                    raise TypeError(f"response body items must be bytes, not {type(chunk)}")
                if chunk:
                    await cycle.send(bytes(chunk))
            await cycle.finish()
            return
        if lease is None:
            lease = self._pool().lease()
            try:
                await self._send_iterable(cycle, body, lease)
            finally:
                lease.release()
        else:
            await self._send_iterable(cycle, body, lease)

    async def _send_iterable(  # type: ignore[misc]
        self: HttpProtocol, cycle: RequestCycle, body: Any, lease: Lease
    ) -> None:
        iterator = await lease.run(iter, body)
        while True:
            chunk = await lease.run(_next_chunk, iterator)
            if chunk is _DONE:
                break
            if not isinstance(chunk, (bytes, bytearray)):
                raise TypeError(f"response body items must be bytes, not {type(chunk)}")
            if chunk:
                await cycle.send(bytes(chunk))
        await cycle.finish()

    async def _send_file(  # type: ignore[misc]
        self: HttpProtocol, cycle: RequestCycle, wrapper: FileWrapper, lease: Lease | None
    ) -> bool:
        """Send a file body with ``loop.sendfile`` (or a copy of its extent); ``False`` when
        the wrapped object is not a regular file, so the caller iterates it instead."""
        extent = _file_extent(wrapper.filelike)
        if extent is None:
            return False
        fd, offset, count = extent
        if cycle.status is None:
            raise RuntimeError("the application did not call start_response() (PEP 3333)")
        if self.flow.lost or self.transport.is_closing():
            raise ClientDisconnected("the connection is closed")
        prefix, count = cycle.raw_prefix(count)
        if prefix:
            self.transport.write(prefix)
        if count:
            sent = 0
            if self.transport.get_extra_info("sslcontext") is None:
                try:
                    sent = await self.loop.sendfile(
                        self.transport, wrapper.filelike, offset, count, fallback=False
                    )
                except NotImplementedError:
                    # uvloop has no loop.sendfile: drive os.sendfile ourselves.
                    sent = await self._sendfile_dup(fd, offset, count)
                except asyncio.SendfileNotAvailableError:
                    sent = -1
                except (ConnectionError, RuntimeError) as exc:
                    if self.flow.lost or self.transport.is_closing():
                        raise ClientDisconnected("the connection is closed") from exc
                    raise
                if sent >= 0:
                    STATS["sendfile_calls"] += 1
                    STATS["sendfile_bytes"] += sent
            else:
                sent = -1
            if sent < 0:
                sent = await self._copy_file(fd, offset, count, lease)
            if sent != count:
                self.log.error(
                    "File for %s %s ended after %d of %d bytes; closing the connection",
                    cycle.method,
                    cycle.environ.get("RAW_URI", ""),
                    sent,
                    count,
                )
                raise _BrokenFraming
            if cycle.chunked:
                self.transport.write(b"\r\n")
        await cycle.finish()
        return True

    async def _sendfile_dup(self: HttpProtocol, fd: int, offset: int, count: int) -> int:  # type: ignore[misc]
        """Zero-copy ``os.sendfile`` from ``fd`` to the connection's socket, on the loop.

        For loops without ``loop.sendfile`` (uvloop).  The socket belongs to the transport, so
        writability is watched on a duplicate descriptor; the kernel writes only while the
        transport's own buffer is empty, so bytes never interleave.  Each call sends at most
        :data:`SENDFILE_BLOCK` and then yields to the loop.  Returns the bytes sent (fewer if the
        file is shorter), or -1 when the transport exposes no socket.
        """
        transport = self.transport
        sock = transport.get_extra_info("socket")
        try:
            sock_fd = sock.fileno() if sock is not None else -1
        except (OSError, ValueError):
            sock_fd = -1
        if sock_fd < 0:
            return -1
        loop = self.loop
        out = os.dup(sock_fd)
        sent = 0
        try:
            while sent < count:
                if self.flow.lost or transport.is_closing():
                    raise ClientDisconnected("the connection is closed")
                if transport.get_write_buffer_size() == 0:
                    try:
                        n = os.sendfile(out, fd, offset + sent, min(count - sent, SENDFILE_BLOCK))
                    except (BlockingIOError, InterruptedError):
                        pass
                    except (BrokenPipeError, ConnectionError) as exc:
                        raise ClientDisconnected("the client closed the connection") from exc
                    else:
                        if n == 0:
                            break  # the file is shorter than announced
                        sent += n
                        if sent < count:
                            await asyncio.sleep(0)  # let the loop's other connections run
                        continue
                writable: asyncio.Future[None] = loop.create_future()
                loop.add_writer(out, _wake, writable)
                try:
                    await asyncio.wait_for(writable, self.config.send_timeout)
                except TimeoutError:
                    self._send_stalled()
                    raise ClientDisconnected("the client stopped reading") from None
                finally:
                    loop.remove_writer(out)
        finally:
            os.close(out)
        return sent

    async def _copy_file(  # type: ignore[misc]
        self: HttpProtocol, fd: int, offset: int, count: int, lease: Lease | None
    ) -> int:
        """Write ``count`` bytes of ``fd`` from ``offset``, read off the loop; return the
        number written (less if the file is shorter)."""
        sent = 0
        block = 256 * 1024
        while sent < count:
            if self.flow.lost or self.transport.is_closing():
                raise ClientDisconnected("the client closed the connection")
            data: bytes = await self._off_loop(
                lease, os.pread, fd, min(block, count - sent), offset + sent
            )
            if not data:
                break
            self.transport.write(data)
            sent += len(data)
            await self.drain()
        return sent

    async def _close_body(  # type: ignore[misc]
        self: HttpProtocol,
        cycle: RequestCycle,
        body: Any,
        lease: Lease | None,
        *,
        release: bool = False,
    ) -> None:
        """PEP 3333 / contract: ``await body.aclose()`` if it has one, else ``close()`` off-loop
        (on ``lease`` when given, so a sync app closes on the thread that ran it).  With
        ``release``, the lease is released once the close has run.

        Not cancelled by the server: from here on a disconnect or the request timeout leaves
        the request's task alone (``cycle.closing``), so the close always runs to its end and the
        file or generator cannot leak.  That costs no task and no extra loop iteration, where
        ``asyncio.shield`` costs both on every request.
        """
        cycle.closing = True
        release_later = False
        try:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
                return
            close = getattr(body, "close", None)
            if close is not None:
                if lease is not None:
                    future = lease.submit(contextvars.copy_context().run, close)
                    if release:
                        release_later = True
                        future.add_done_callback(lambda _: lease.release())
                else:
                    future = self._pool().run(close)
                await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("Error closing the response body")
        finally:
            if release and lease is not None and not release_later:
                lease.release()

    async def drain(self: HttpProtocol) -> None:  # type: ignore[misc]
        """Wait while the transport is above its high-water mark, at most ``send_timeout``;
        a client that stalls longer is dropped (:class:`ClientDisconnected` is raised)."""
        flow = self.flow
        if not flow.write_paused:
            return
        try:
            await asyncio.wait_for(flow.drain(), self.config.send_timeout)
        except TimeoutError:
            self._send_stalled()
            raise ClientDisconnected("the client stopped reading") from None

    def _send_stalled(self: HttpProtocol) -> None:  # type: ignore[misc]
        self.log.info(
            "Dropping %s: it read nothing for %ss", self._peer_text(), self.config.send_timeout
        )
        self.abort()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _file_extent(filelike: Any) -> tuple[int, int, int] | None:
    """``(fd, offset, bytes_to_end)`` of a regular file object, else ``None``."""
    try:
        fd = filelike.fileno()
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        offset = filelike.tell()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    return fd, offset, max(0, info.st_size - offset)
