"""A minimal WebSocket client on raw sockets, for tests that need what a library client hides:
dropping the TCP connection without a close frame (FIN or RST), not answering a close frame,
or many thousands of cheap cycles.  Client frames are masked (RFC 6455 section 5.3); no
extension is offered, so server frames arrive uncompressed.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct

__all__ = [
    "close_frame",
    "handshake",
    "parse_frames",
    "read_frame",
    "set_rst_on_close",
    "text_frame",
]


def handshake(path: str, host: str = "127.0.0.1") -> bytes:
    """A valid opening handshake for ``path`` (RFC 6455 section 4.1), without extensions."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def _frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def text_frame(text: str) -> bytes:
    """A masked, unfragmented text frame."""
    return _frame(0x1, text.encode())


def close_frame(code: int = 1000, reason: str = "") -> bytes:
    """A masked close frame with ``code``."""
    return _frame(0x8, struct.pack("!H", code) + reason.encode())


def parse_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split unmasked server frames into ``(opcode, payload)``; a partial frame at the end is
    left out."""
    frames = []
    while len(data) >= 2:
        opcode, size = data[0] & 0x0F, data[1] & 0x7F
        offset = 2
        if size == 126:
            if len(data) < 4:
                break
            size, offset = struct.unpack("!H", data[2:4])[0], 4
        elif size == 127:
            if len(data) < 10:
                break
            size, offset = struct.unpack("!Q", data[2:10])[0], 10
        if len(data) < offset + size:
            break
        frames.append((opcode, data[offset : offset + size]))
        data = data[offset + size :]
    return frames


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one unmasked server frame: ``(opcode, payload)``."""
    first, second = await reader.readexactly(2)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", await reader.readexactly(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", await reader.readexactly(8))[0]
    return first & 0x0F, await reader.readexactly(size)


def set_rst_on_close(sock: socket.socket) -> None:
    """Make ``close()`` reset the connection (SO_LINGER 0) instead of sending FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
