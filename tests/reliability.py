"""Shared pieces of the reliability evidence: protocol fuzzing, slowloris, disconnect storm, soak.

Two halves, neither importing pytest (``benchmarks/fuzz.py`` and ``benchmarks/soak.py`` use them
outside the test runner):

* In process: :func:`run_stream` feeds bytes, split into given pieces, to a real
  :class:`~async_handler.protocol.HttpProtocol` through :class:`LoopbackTransport` (a fake
  transport that honours ``pause_reading`` the way a socket transport does), drives the loop until
  the connection is quiescent, and reports an :class:`Outcome`: every exception that escaped a
  protocol callback or a task, the parsed responses, whether the connection closed, what the
  application saw.  The hypothesis strategies that build valid and mutated requests live here
  too, with the oracles (:func:`stream_problems`, :func:`expected_observation`).
* Over sockets: a small keep-alive HTTP/1.1 client on asyncio (:class:`HttpConnection`),
  ``/proc`` samplers (RSS, descriptors) and PostgreSQL session counts by ``application_name``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import os
import traceback
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import httptools
from hypothesis import strategies as st

from async_handler.protocol import HttpProtocol, ServerConfig, ServerState
from async_handler.threads import ThreadPool

__all__ = [
    "APP_KINDS",
    "QUIET_CONFIG",
    "SHORT_CONFIG",
    "ContractObserver",
    "HttpConnection",
    "LoopbackTransport",
    "Outcome",
    "PlainObserver",
    "RequestSpec",
    "cut",
    "expected_observation",
    "fd_count",
    "fd_kinds",
    "make_app",
    "mutated_streams",
    "percentile",
    "pg_sessions",
    "request_specs",
    "rss_kib",
    "run_stream",
    "stream_problems",
]

# ---------------------------------------------------------------------------------------------
# In-process driving of HttpProtocol


class LoopbackTransport(asyncio.Transport):
    """A transport that records writes and behaves like asyncio's socket transport where the
    protocol can tell: ``write`` after ``write_eof`` raises, ``close`` calls
    ``connection_lost`` on a later loop iteration, and a paused transport delivers nothing (the
    driver checks :attr:`reading` before each ``data_received``)."""

    def __init__(self, protocol: HttpProtocol, guard: Callable[..., Any]) -> None:
        super().__init__()
        self.protocol = protocol
        self.guard = guard
        self.out = bytearray()
        self.closed = False
        self.lost = False
        self.reading = True
        self.eof_written = False
        self.extra: dict[str, Any] = {
            "peername": ("127.0.0.1", 40000),
            "sockname": ("127.0.0.1", 8000),
        }

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof_written:
            # asyncio's socket transport raises exactly this.
            raise RuntimeError("Cannot call write() after write_eof()")
        if not self.closed:
            self.out += data

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self._lose)

    def _lose(self) -> None:
        self.lost = True
        self.guard("connection_lost", self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading and not self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class _Log:
    """The protocol's logger: errors are findings (the fuzz apps never fail); warnings (refused
    requests) are expected."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        pass

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        pass

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        pass

    def error(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self.problems.append("logged error: " + (msg % args if args else msg))

    def exception(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self.problems.append(
            "logged exception: " + (msg % args if args else msg) + "\n" + traceback.format_exc()
        )


def _essentials(environ: dict[str, Any], body: bytes) -> dict[str, Any]:
    keys = (
        "REQUEST_METHOD",
        "PATH_INFO",
        "QUERY_STRING",
        "RAW_URI",
        "SERVER_PROTOCOL",
        "CONTENT_TYPE",
        "CONTENT_LENGTH",
    )
    seen = {k: environ[k] for k in keys if k in environ}
    seen.update({k: v for k, v in environ.items() if k.startswith("HTTP_")})
    seen["body"] = body
    return seen


def _reply(seen: dict[str, Any]) -> bytes:
    # Ties each response to its request, so that ordering mistakes show.
    return f"{seen['REQUEST_METHOD']} {seen['RAW_URI']} {len(seen['body'])}".encode("latin-1")


class PlainObserver:
    """A plain WSGI application (runs on a pool thread) recording what it was given."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen = _essentials(environ, environ["wsgi.input"].read())
        self.seen.append(seen)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [_reply(seen)]


class ContractObserver:
    """A contract application (awaited on the loop) recording what it was given."""

    async_handler_awaitable = True

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen = _essentials(environ, environ["wsgi.input"].read())
        self.seen.append(seen)
        await asyncio.sleep(0)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [_reply(seen)]


APP_KINDS = ("contract", "plain")


def make_app(kind: str) -> PlainObserver | ContractObserver:
    """A fresh observing application of ``kind`` (``"contract"`` or ``"plain"``)."""
    if kind == "contract":
        return ContractObserver()
    if kind == "plain":
        return PlainObserver()
    raise ValueError(f"unknown app kind {kind!r}; expected one of {APP_KINDS}")


#: Timeouts long enough never to fire while a valid request is fed.
QUIET_CONFIG = ServerConfig(linger_timeout=0.05)
#: Every timer short, so that a connection left waiting for bytes closes itself quickly; the
#: "ends in a response or a close" oracle relies on it.
SHORT_CONFIG = ServerConfig(header_timeout=0.05, keepalive=0.05, linger_timeout=0.02)


@dataclasses.dataclass
class ParsedResponse:
    """One response parsed back from the protocol's output."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = False


class _ResponseReader:
    def __init__(self) -> None:
        self.responses: list[ParsedResponse] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.responses.append(ParsedResponse(0, []))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.responses[-1].headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.responses[-1].status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.responses[-1].body += body

    def on_message_complete(self) -> None:
        self.responses[-1].complete = True


def parse_output(data: bytes) -> tuple[list[ParsedResponse], str | None]:
    """Parse a response stream (no HEAD responses in it); return responses and any error."""
    reader = _ResponseReader()
    try:
        reader.parser.feed_data(data)
    except httptools.HttpParserError as exc:
        return reader.responses, f"malformed response stream ({exc!r})"
    return reader.responses, None


@dataclasses.dataclass
class Outcome:
    """What one byte stream did to a connection."""

    output: bytes
    responses: list[ParsedResponse]
    closed: bool
    lost: bool
    problems: list[str]
    seen: list[dict[str, Any]]
    open_connections: int
    pending_tasks: int

    @property
    def finals(self) -> list[ParsedResponse]:
        """Final (non-1xx) responses."""
        return [r for r in self.responses if r.status >= 200]


async def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.001)
    return True


async def _drive(
    kind: str,
    chunks: Sequence[bytes],
    config: ServerConfig,
    pool: ThreadPool,
    *,
    end: str,
    responses: int | None,
    settle: float,
) -> Outcome:
    loop = asyncio.get_running_loop()
    problems: list[str] = []

    def on_loop_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        detail = "".join(traceback.format_exception(exc)) if exc is not None else ""
        problems.append(f"loop error: {context.get('message')}\n{detail}")

    loop.set_exception_handler(on_loop_error)

    def guard(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except BaseException as exc:  # any escape is the finding
            problems.append(f"{name} raised:\n{''.join(traceback.format_exception(exc))}")
            return None

    app = make_app(kind)
    state = ServerState(config, pool=pool, log=_Log(problems))
    proto = HttpProtocol(app, state)
    transport = LoopbackTransport(proto, guard)
    guard("connection_made", proto.connection_made, transport)

    def can_read() -> bool:
        return transport.closed or transport.reading

    for chunk in chunks:
        # A paused socket transport delivers nothing; the protocol must resume or close.
        if not await _wait(can_read, settle):
            problems.append("reading stayed paused with input pending (connection hung)")
            break
        if transport.closed:
            break
        guard("data_received", proto.data_received, chunk)
        await asyncio.sleep(0)
    if responses is not None:
        await _wait(
            lambda: transport.closed
            or sum(r.complete for r in parse_output(bytes(transport.out))[0]) >= responses,
            settle,
        )
    if end == "eof":
        if not await _wait(can_read, settle):
            problems.append("reading stayed paused; EOF never delivered (connection hung)")
        elif not transport.closed:
            keep_open = guard("eof_received", proto.eof_received)
            if not keep_open:
                transport.close()
    elif end == "lost":
        transport.abort()
    elif end != "none":
        raise ValueError(f"end must be 'eof', 'lost' or 'none', got {end!r}")
    current = asyncio.current_task()

    def quiet() -> bool:
        others = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        return transport.lost and not state.connections and not others

    await _wait(quiet, settle)
    others = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    if others:
        # Reported below as a finding; they must still end once cancelled.
        for task in others:
            task.cancel()
        _, stuck = await asyncio.wait(others, timeout=settle)
        if stuck:
            problems.append(f"{len(stuck)} task(s) ignored cancellation: {stuck!r}")
    output = bytes(transport.out)
    parsed, error = parse_output(output)
    if error is not None:
        problems.append(error)
    return Outcome(
        output=output,
        responses=parsed,
        closed=transport.closed,
        lost=transport.lost,
        problems=problems,
        seen=app.seen,
        open_connections=len(state.connections),
        pending_tasks=len(others),
    )


def run_stream(
    kind: str,
    chunks: Sequence[bytes],
    pool: ThreadPool,
    *,
    config: ServerConfig = SHORT_CONFIG,
    end: str = "none",
    responses: int | None = None,
    settle: float = 3.0,
) -> Outcome:
    """Feed ``chunks`` to a new connection served by an observing app of ``kind``.

    ``end``: ``"none"`` leaves the client connected (the server's timers must end the
    connection), ``"eof"`` half-closes after the data, ``"lost"`` drops the connection.
    ``responses``: wait for that many complete responses before ``end``.  Every wait is bounded
    by ``settle`` seconds.
    """
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(
            _drive(kind, chunks, config, pool, end=end, responses=responses, settle=settle)
        )
    finally:
        # Unlike asyncio.run(), never wait without bound for what a finding left running.
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def cut(data: bytes, points: Sequence[int]) -> list[bytes]:
    """Split ``data`` at ``points`` (any order, duplicates and out-of-range values allowed)."""
    edges = sorted({min(max(p, 0), len(data)) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a] or [b""]


def stream_problems(outcome: Outcome, *, client_stayed: bool) -> list[str]:
    """The oracles every stream must satisfy, valid or not; returns what was violated.

    Nothing escapes a callback or a task and nothing is logged as an error; the output is a
    well-formed sequence of complete responses; a server refusal (4xx/5xx: the observing apps
    only answer 200) is the last response; the connection ends (by a response and close, a
    timeout, or the client leaving) and leaves no task behind.  With ``client_stayed`` (no EOF,
    no drop) every request the application saw got its response, in order.
    """
    problems = list(outcome.problems)
    finals = outcome.finals
    if any(not r.complete for r in outcome.responses):
        problems.append("incomplete response in the output")
    for i, response in enumerate(finals):
        if response.status >= 400 and i != len(finals) - 1:
            problems.append(f"response after a {response.status} refusal")
        if response.status != 200 and response.status < 400:
            problems.append(f"unexpected status {response.status}")
    answered = [r for r in finals if r.status == 200]
    if client_stayed and len(answered) != len(outcome.seen):
        problems.append(
            f"the application answered {len(outcome.seen)} request(s) but "
            f"{len(answered)} 200 response(s) were written"
        )
    for response, seen in zip(answered, outcome.seen, strict=False):
        if response.body != _reply(seen):
            problems.append(f"response {response.body!r} does not answer {_reply(seen)!r}")
    if not outcome.lost:
        problems.append("the connection never ended (no close within the settle time)")
    if outcome.open_connections:
        problems.append("the connection is still registered in ServerState.connections")
    if outcome.pending_tasks:
        problems.append(f"{outcome.pending_tasks} task(s) still running after the close")
    return problems


# ---------------------------------------------------------------------------------------------
# Request generators

_TCHAR_NAME = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-"
_PCHAR = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@"
_QCHAR = _PCHAR + "/?"
_VCHAR = "".join(chr(c) for c in range(0x21, 0x7F))


@dataclasses.dataclass
class RequestSpec:
    """A valid HTTP/1.x request, and how it is written on the wire."""

    method: str
    path: str
    query: str | None
    version: str
    headers: list[tuple[str, str, str, str]]  # name, value, OWS before, OWS after
    host: str | None
    content_type: str | None
    body: bytes
    framing: str  # "none", "length" or "chunked"
    chunk_sizes: list[int]
    chunk_upper: bool
    trailers: list[tuple[str, str]]
    connection: str | None

    @property
    def target(self) -> str:
        return self.path if self.query is None else f"{self.path}?{self.query}"

    def wire(self) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/{self.version}"]
        if self.host is not None:
            lines.append(f"Host: {self.host}")
        for name, value, before, after in self.headers:
            lines.append(f"{name}:{before}{value}{after}")
        if self.content_type is not None:
            lines.append(f"Content-Type: {self.content_type}")
        if self.connection is not None:
            lines.append(f"Connection: {self.connection}")
        if self.framing == "length":
            lines.append(f"Content-Length: {len(self.body)}")
        elif self.framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if self.framing == "length":
            return head + self.body
        if self.framing != "chunked":
            return head
        parts = [head]
        pos = 0
        for size in self.chunk_sizes:
            piece = self.body[pos : pos + size]
            pos += size
            size_text = f"{len(piece):X}" if self.chunk_upper else f"{len(piece):x}"
            parts.append(size_text.encode() + b"\r\n" + piece + b"\r\n")
        parts.append(b"0\r\n")
        for name, value in self.trailers:
            parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        parts.append(b"\r\n")
        return b"".join(parts)


def expected_observation(spec: RequestSpec) -> dict[str, Any]:
    """What a WSGI application must see for ``spec`` (PEP 3333 plus gunicorn's conventions)."""
    raw_path = spec.path
    path_info = (
        urllib.parse.unquote_to_bytes(raw_path).decode("latin-1") if "%" in raw_path else raw_path
    )
    seen: dict[str, Any] = {
        "REQUEST_METHOD": spec.method,
        "PATH_INFO": path_info,
        "QUERY_STRING": spec.query or "",
        "RAW_URI": spec.target,
        "SERVER_PROTOCOL": f"HTTP/{spec.version}",
    }
    if spec.host is not None:
        seen["HTTP_HOST"] = spec.host
    fields = [(name, value) for name, value, _, _ in spec.headers]
    if spec.connection is not None:
        fields.append(("Connection", spec.connection))
    if spec.framing == "chunked":
        fields.append(("Transfer-Encoding", "chunked"))
    for name, value in fields:
        if "_" in name:
            continue  # gunicorn header_map="drop"
        key = "HTTP_" + name.upper().replace("-", "_")
        seen[key] = value if key not in seen else f"{seen[key]},{value}"
    if spec.content_type is not None:
        seen["CONTENT_TYPE"] = spec.content_type
    if spec.framing == "length":
        seen["CONTENT_LENGTH"] = str(len(spec.body))
    elif spec.framing == "chunked":
        seen["CONTENT_LENGTH"] = str(len(spec.body))
    seen["body"] = spec.body
    return seen


_RESERVED_NAMES = {
    "HOST",
    "CONTENT-LENGTH",
    "CONTENT-TYPE",
    "TRANSFER-ENCODING",
    "EXPECT",
    "CONNECTION",
    "UPGRADE",
    "TE",
}


def _header_name(name: str) -> bool:
    upper = name.upper()
    return upper not in _RESERVED_NAMES and not upper.startswith("X-FORWARDED")


_segment = st.lists(
    st.one_of(
        st.text(_PCHAR, min_size=1, max_size=8),
        st.binary(min_size=1, max_size=3).map(lambda b: "".join(f"%{x:02X}" for x in b)),
    ),
    max_size=3,
).map("".join)
_paths = st.lists(_segment, min_size=1, max_size=4).map(lambda segs: "/" + "/".join(segs))
_values = st.text(_VCHAR + " \t", max_size=40).map(lambda v: v.strip(" \t"))
_ows = st.sampled_from(["", " ", "  ", "\t", " \t"])
_fields = st.tuples(
    st.text(_TCHAR_NAME + "_", min_size=1, max_size=16).filter(_header_name),
    _values,
    _ows,
    _ows,
)


@st.composite
def request_specs(draw: st.DrawFn, *, last: bool = True) -> RequestSpec:
    """A valid request; with ``last=False`` it keeps the connection open for a next one."""
    version = draw(st.sampled_from(["1.1", "1.1", "1.0"]))
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]))
    host: str | None = draw(st.sampled_from(["example.com", "127.0.0.1:8000", "h"]))
    if version == "1.0" and draw(st.booleans()):
        host = None
    framings = ["none", "length"] + (["chunked"] if version == "1.1" else [])
    framing = draw(st.sampled_from(framings))
    body = draw(st.binary(max_size=300)) if framing != "none" else b""
    chunk_sizes: list[int] = []
    if framing == "chunked":
        remaining = len(body)
        while remaining:
            size = draw(st.integers(1, remaining))
            chunk_sizes.append(size)
            remaining -= size
    if version == "1.0":
        connection = "keep-alive" if not last or draw(st.booleans()) else None
    else:
        connection = draw(st.sampled_from([None, "keep-alive"])) if not last else (
            draw(st.sampled_from([None, "close", "keep-alive"]))
        )
    return RequestSpec(
        method=method,
        path=draw(_paths),
        query=draw(st.one_of(st.none(), st.text(_QCHAR, max_size=20))),
        version=version,
        headers=draw(st.lists(_fields, max_size=6)),
        host=host,
        content_type=draw(st.one_of(st.none(), st.sampled_from(["text/plain", "a/b; q=1"]))),
        body=body,
        framing=framing,
        chunk_sizes=chunk_sizes,
        chunk_upper=draw(st.booleans()),
        trailers=(
            draw(st.lists(st.tuples(st.sampled_from(["X-T", "Digest"]), _values), max_size=2))
            if framing == "chunked"
            else []
        ),
        connection=connection,
    )


@st.composite
def pipelines(draw: st.DrawFn, max_requests: int = 3) -> list[RequestSpec]:
    """One to ``max_requests`` valid requests for one connection; only the last may close."""
    count = draw(st.integers(1, max_requests))
    return [draw(request_specs(last=i == count - 1)) for i in range(count)]


_INTERESTING = [
    b"\r\n",
    b"\r\n\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b" ",
    b"\t",
    b":",
    b"\x7f",
    b"\xff",
    b"HTTP/1.1",
    b"HTTP/2.0",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 99999999999999999999999\r\n",
    b"Content-Length: -1\r\n",
    b"Expect: 100-continue\r\n",
    b"Connection: close\r\n",
    b"Host: second\r\n",
    b"X_Under: 1\r\n",
    b"0\r\n\r\n",
    b"ffffffffffffffff\r\n",
    b"5;ext=1\r\nhello\r\n",
    b"GET / HTTP/1.1\r\nHost: p\r\n\r\n",
    b"a" * 5000,
    b"%00",
    b"%",
    b"?#",
    b"http://h/x",
    b"*",
]


@st.composite
def _mutation(draw: st.DrawFn, data: bytes) -> bytes:
    size = len(data)
    op = draw(st.sampled_from(["set", "insert", "delete", "duplicate", "truncate", "swapcase"]))
    at = draw(st.integers(0, size))
    if op == "set" and size:
        at = min(at, size - 1)
        byte = draw(st.one_of(st.binary(min_size=1, max_size=1), st.sampled_from(_INTERESTING)))
        return data[:at] + byte[:1] + data[at + 1 :]
    if op == "insert":
        piece = draw(st.one_of(st.sampled_from(_INTERESTING), st.binary(min_size=1, max_size=8)))
        return data[:at] + piece + data[at:]
    if op == "delete":
        length = draw(st.integers(1, 16))
        return data[:at] + data[at + length :]
    if op == "duplicate":
        length = draw(st.integers(1, 64))
        return data[:at] + data[at : at + length] + data[at:]
    if op == "truncate":
        return data[:at]
    if op == "swapcase":
        length = draw(st.integers(1, 16))
        return data[:at] + data[at : at + length].swapcase() + data[at + length :]
    return data


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    """A byte stream derived from valid requests by one to four mutations (or raw noise)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    data = b"".join(spec.wire() for spec in draw(pipelines()))
    for _ in range(draw(st.integers(1, 4))):
        data = draw(_mutation(data))
    return data


# ---------------------------------------------------------------------------------------------
# Over sockets: a keep-alive client, /proc samplers, PostgreSQL


class HttpError(Exception):
    """The server's answer could not be read as an HTTP/1.1 response."""


class HttpConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams (no pipelining).

    :meth:`request` returns ``(status, headers, body)``; it raises ``OSError``,
    :class:`asyncio.IncompleteReadError` or :class:`HttpError` on failure (the caller counts
    them) and reconnects when the server closed the previous response's connection.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self.reader, self.writer

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        close: bool = False,
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request and read its whole response."""
        reader, writer = await self._connect()
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{k}: {v}" for k, v in headers]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        if close:
            lines.append("Connection: close")
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            status, fields, payload = await self._read(reader)
        except BaseException:
            await self.close()
            raise
        if close or fields.get("connection", "").lower() == "close":
            await self.close()
        return status, fields, payload

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head[:-4].split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
                raise HttpError(f"bad status line {lines[0][:100]!r}")
            status = int(parts[1])
            fields: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(b":")
                if not sep:
                    raise HttpError(f"bad header line {line[:100]!r}")
                fields[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
            if status >= 200:
                break
        if "chunked" in fields.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                chunks.append(await reader.readexactly(size))
                if await reader.readexactly(2) != b"\r\n":
                    raise HttpError("chunk not followed by CRLF")
            return status, fields, b"".join(chunks)
        if "content-length" in fields:
            return status, fields, await reader.readexactly(int(fields["content-length"]))
        if status in (204, 304):
            return status, fields, b""
        return status, fields, await reader.read()


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    """Open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int) -> dict[str, int]:
    """Open descriptors of ``pid`` by kind (``socket``, ``pipe``, ``anon_inode``, ``file``)."""
    kinds: dict[str, int] = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        kind = target.split(":", 1)[0] if ":" in target and not target.startswith("/") else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3"


def pg_sessions(appname: str, dsn: str = PG_DSN) -> int:
    """Sessions in ``pg_stat_activity`` whose ``application_name`` is ``appname``."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (appname,)
        ).fetchone()
    return int(row[0]) if row else 0


def pg_unavailable(dsn: str = PG_DSN) -> str | None:
    """``None`` when PostgreSQL answers on ``dsn``; otherwise why not."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # the reason is reported, whatever it is
        return f"PostgreSQL is not reachable at {dsn!r}: {exc}"
    return None


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]
