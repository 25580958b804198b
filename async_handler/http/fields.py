"""HTTP/1.1 field syntax and small stdlib-only helpers shared by the request and the response.

Byte-level pieces that do not depend on a connection: status lines, the cached ``Date`` header,
response-header validation, refusal responses, request-body spooling and proxy trust.
"""

from __future__ import annotations

import http
import io
import ipaddress
import re
import tempfile
import time
from collections.abc import Iterable
from email.utils import formatdate
from typing import IO

__all__ = [
    "HOP_BY_HOP",
    "BodySpool",
    "DateHeader",
    "Refusal",
    "TrustedPeers",
    "error_response",
    "status_line",
    "valid_header_name",
    "valid_header_value",
    "valid_status",
]

# RFC 9110 section 5.6.2: token = 1*tchar.
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 section 5.5: field-value is SP / HTAB / VCHAR / obs-text; CR, LF and NUL never appear,
# which is what keeps an application from splitting the response (CWE-113).
_VALUE_RE = re.compile(r"[ \t\x21-\x7e\x80-\xff]*")
# RFC 9112 section 4 and PEP 3333: three digits, then optionally one SP and a reason phrase.
_STATUS_RE = re.compile(r"[0-9]{3}(?: [ \t\x21-\x7e\x80-\xff]*)?")

#: Response fields that describe one connection (RFC 9110 section 7.6.1): the server frames the
#: message itself, so an application's values for these are dropped (gunicorn does the same).
HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade")
)

#: Fields a chunked trailer must not carry (RFC 9110 section 6.5.1): they would alter the
#: message's framing, routing or authentication after the fact.  gunicorn's list
#: (``RFC9110_6_5_1_FORBIDDEN_TRAILER`` in ``gunicorn/http/message.py``), lowercased.
FORBIDDEN_TRAILERS = frozenset(
    (b"host", b"content-length", b"transfer-encoding", b"trailer", b"authorization", b"te")
)


def valid_header_name(name: str) -> bool:
    """Whether ``name`` is an RFC 9110 token."""
    return _TOKEN_RE.fullmatch(name) is not None


def valid_header_value(value: str) -> bool:
    """Whether ``value`` holds only field-value characters (no CR, LF or NUL)."""
    return _VALUE_RE.fullmatch(value) is not None


# A handful of distinct status strings cover nearly all traffic; the bound keeps an application
# that invents reason phrases from growing the cache without limit.
_STATUS_CACHE_MAX = 256
_valid_statuses: set[str] = set()


def valid_status(status: str) -> bool:
    """Whether ``status`` is a PEP 3333 status string such as ``"200 OK"``."""
    if status in _valid_statuses:
        return True
    if _STATUS_RE.fullmatch(status) is None:
        return False
    if len(_valid_statuses) < _STATUS_CACHE_MAX:
        _valid_statuses.add(status)
    return True


_status_cache: dict[str, bytes] = {}


def status_line(status: str) -> bytes:
    """Return ``b"HTTP/1.1 <status>\\r\\n"`` for a validated status string, cached."""
    line = _status_cache.get(status)
    if line is None:
        # RFC 9112 section 4: the SP after the status code is required even without a reason.
        text = status if len(status) > 3 else status + " "
        line = b"HTTP/1.1 " + text.encode("latin-1") + b"\r\n"
        if len(_status_cache) < _STATUS_CACHE_MAX:
            _status_cache[status] = line
    return line


class DateHeader:
    """The ``Date`` header line (RFC 9110 section 6.6.1), formatted at most once a second."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        """Return ``b"Date: <IMF-fixdate>\\r\\n"`` for the current second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._line = b"Date: " + formatdate(second, usegmt=True).encode("ascii") + b"\r\n"
        return self._line


class Refusal(Exception):
    """A request the server answers itself, with ``status`` and a plain-text ``reason``.

    Raised from parser callbacks; the connection is closed after the answer (nothing pipelined
    behind a refused request is trusted, since its framing may be what was wrong).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


def error_response(status: int, reason: str, date: bytes, server: bytes) -> bytes:
    """Return a complete ``Connection: close`` response with ``reason`` as a text/plain body."""
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    body = (reason + "\n").encode("utf-8", "replace")
    return b"".join(
        (
            f"HTTP/1.1 {status} {phrase}\r\n".encode("ascii"),
            server,
            date,
            b"Connection: close\r\n",
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n\r\n" % len(body),
            body,
        )
    )


class TrustedPeers:
    """``forwarded_allow_ips`` as gunicorn reads it: addresses or networks, or ``"*"``."""

    __slots__ = ("_any", "_networks")

    def __init__(self, allowed: Iterable[str]) -> None:
        entries = [a.strip() for a in allowed if a.strip()]
        self._any = "*" in entries
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in entries:
            if entry == "*":
                continue
            try:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError as exc:
                raise ValueError(
                    f"forwarded_allow_ips: {entry!r} is not an IP address or network"
                ) from exc

    def __contains__(self, address: object) -> bool:
        if self._any:
            return True
        if not isinstance(address, str):
            return False
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        return any(ip in net for net in self._networks)


class BodySpool:
    """Collects a request body: in memory up to ``threshold`` bytes, then in a temporary file.

    The disk writes past the threshold happen on the event loop; they go to the page cache, and
    bodies that large are rare next to the cost of a thread hop per received segment.
    """

    __slots__ = ("_file", "_threshold", "size")

    def __init__(self, threshold: int) -> None:
        self._threshold = threshold
        self._file: IO[bytes] = io.BytesIO()
        self.size = 0

    def write(self, data: bytes) -> None:
        """Append ``data``; moves to a temporary file when the threshold is crossed."""
        self.size += len(data)
        if self.size > self._threshold and isinstance(self._file, io.BytesIO):
            spilled = tempfile.TemporaryFile()
            spilled.write(self._file.getbuffer())
            self._file = spilled
        self._file.write(data)

    def finish(self) -> IO[bytes]:
        """Return the body file positioned at 0, for ``wsgi.input``."""
        self._file.seek(0)
        return self._file

    def close(self) -> None:
        """Discard the body (removes the temporary file, if any)."""
        self._file.close()
