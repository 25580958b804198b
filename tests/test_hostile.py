"""Hostile input to the worker over real sockets: framing conflicts, smuggling, limits, injection.

Every refused case checks four things: the status the RFC asks for (or, where the request is
merely incomplete, a close without a response), that the connection is closed afterwards, that the
application was never called (the call log holds only the sentinel ``GET /pid``), and that the
same worker still serves (a parser error must not crash it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.server import CONTRACT_APP, GunicornServer, exchange, gunicorn_server

pytestmark = [pytest.mark.server, pytest.mark.timeout(60)]

HEAD = b"POST /echo HTTP/1.1\r\nHost: hostile.test\r\n"


@pytest.fixture(scope="module")
def server() -> Iterator[GunicornServer]:
    with gunicorn_server(CONTRACT_APP) as srv:
        yield srv


def assert_refused(
    server: GunicornServer,
    data: bytes,
    statuses: set[int] | None,
    *,
    half_close: bool = False,
    timeout: float = 5.0,
) -> None:
    """Send ``data``; expect one refusal in ``statuses`` (None: any 4xx/5xx, or none at all)
    then a close, and the application never called by the same, living worker."""
    pid = server.worker_pid()
    mark = server.call_mark()
    result = exchange(server.port, data, half_close=half_close, timeout=timeout)
    finals = [r for r in result.responses if r.status >= 200]
    detail = f"sent {data[:300]!r}\ngot {result.raw[:500]!r}"
    assert result.closed, f"connection left open after a refusal; {detail}"
    if statuses is None:
        assert len(finals) <= 1, detail
        assert all(r.status >= 400 for r in finals), detail
    else:
        assert len(finals) == 1, f"expected one response in {sorted(statuses)}; {detail}"
        assert finals[0].status in statuses, f"expected {sorted(statuses)}; {detail}"
    server.assert_app_not_called(mark, pid)


# -- message framing (RFC 9112 §6) ---------------------------------------------------------------

# Request smuggling rests on two parties disagreeing on where a body ends; any ambiguity in
# Content-Length or Transfer-Encoding is answered with 400 and a close (RFC 9112 §6.3 rules 3-5,
# §11.2).  Unknown transfer codings may be 501 (RFC 9112 §6.1).
FRAMING = {
    "cl-and-te": (
        HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        {400},
    ),
    "te-and-cl": (
        HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        {400},
    ),
    "cl-duplicate-same": (HEAD + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", {400}),
    "cl-duplicate-differing": (
        HEAD + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        {400},
    ),
    "cl-list": (HEAD + b"Content-Length: 5, 5\r\n\r\nhello", {400}),
    "cl-plus": (HEAD + b"Content-Length: +5\r\n\r\nhello", {400}),
    "cl-hex": (HEAD + b"Content-Length: 0x5\r\n\r\nhello", {400}),
    "cl-negative": (HEAD + b"Content-Length: -1\r\n\r\nhello", {400}),
    "cl-space-inside": (HEAD + b"Content-Length: 1 0\r\n\r\n0123456789", {400}),
    "cl-underscore": (HEAD + b"Content-Length: 1_0\r\n\r\n0123456789", {400}),
    "cl-empty": (HEAD + b"Content-Length: \r\n\r\n", {400}),
    "te-gzip-only": (HEAD + b"Transfer-Encoding: gzip\r\n\r\nhello", {400, 501}),
    "te-chunked-then-identity": (
        HEAD + b"Transfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        {400, 501},
    ),
    "te-chunked-twice": (
        HEAD + b"Transfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        {400, 501},
    ),
    "te-xchunked": (
        HEAD + b"Transfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        {400, 501},
    ),
    "te-chunkedx": (
        HEAD + b"Transfer-Encoding: chunkedx\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        {400, 501},
    ),
    "te-vt-before-chunked": (
        HEAD + b"Transfer-Encoding: \x0bchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        {400, 501},
    ),
    "te-vt-after-chunked": (
        HEAD + b"Transfer-Encoding: chunked\x0b\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        {400, 501},
    ),
    "te-formfeed-before-chunked": (
        HEAD + b"Transfer-Encoding: \x0cchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        {400, 501},
    ),
    "te-nul-after-chunked": (
        HEAD + b"Transfer-Encoding: chunked\x00\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        {400, 501},
    ),
    # RFC 9112 §5.2: obs-fold is rejected (or replaced by SP); either way never a new framing.
    "te-obs-fold": (
        HEAD + b"Transfer-Encoding:\r\n chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        {400},
    ),
    # RFC 9112 §5.1: "No whitespace is allowed between the field name and colon"; MUST 400.
    "te-space-before-colon": (
        HEAD + b"Transfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        {400},
    ),
    "cl-space-before-colon": (HEAD + b"Content-Length : 5\r\n\r\nhello", {400}),
    "te-in-http10": (
        b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        {400},
    ),
}


@pytest.mark.parametrize("data,statuses", list(FRAMING.values()), ids=list(FRAMING))
def test_framing_conflict_refused(server: GunicornServer, data: bytes, statuses: set[int]) -> None:
    assert_refused(server, data, statuses)


# -- chunked coding (RFC 9112 §7.1) -----------------------------------------------------------

CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
BAD_CHUNKS = {
    "size-0x-prefix": (CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", {400}),
    "size-plus": (CHUNKED + b"+5\r\nhello\r\n0\r\n\r\n", {400}),
    "size-minus": (CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n", {400}),
    "size-underscore": (CHUNKED + b"5_0\r\n" + b"x" * 80 + b"\r\n0\r\n\r\n", {400}),
    "size-empty": (CHUNKED + b"\r\nhello\r\n0\r\n\r\n", {400}),
    "size-leading-space": (CHUNKED + b" 5\r\nhello\r\n0\r\n\r\n", {400}),
    "bare-lf-in-extension": (CHUNKED + b"5;ext=1\nhello\r\n0\r\n\r\n", {400}),
    "bare-cr-in-extension": (CHUNKED + b"5;ext=1\rx\r\nhello\r\n0\r\n\r\n", {400}),
    "data-not-followed-by-crlf": (CHUNKED + b"5\r\nhelloXX\r\n0\r\n\r\n", {400}),
    "data-longer-than-size": (CHUNKED + b"3\r\nhello\r\n0\r\n\r\n", {400}),
    # 2**64 + 5: a parser that wraps around would read 5 bytes.
    "size-overflows-64-bits": (CHUNKED + b"10000000000000005\r\nhello\r\n0\r\n\r\n", {400, 413}),
    "size-huge": (CHUNKED + b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n", {400, 413}),
}


@pytest.mark.parametrize("data,statuses", list(BAD_CHUNKS.values()), ids=list(BAD_CHUNKS))
def test_bad_chunked_body_refused(server: GunicornServer, data: bytes, statuses: set[int]) -> None:
    assert_refused(server, data, statuses)


def test_chunked_missing_final_crlf_then_half_close(server: GunicornServer) -> None:
    # The last-chunk without the empty line that ends the trailer section (RFC 9112 §7.1) is an
    # incomplete message: never handed to the application, whether or not 400 is sent.
    assert_refused(server, CHUNKED + b"5\r\nhello\r\n0\r\n", None, half_close=True)


def test_truncated_body_then_half_close(server: GunicornServer) -> None:
    # RFC 9112 §8: a message shorter than its Content-Length is incomplete; the body is spooled
    # before the application is called, so it must never see it.
    assert_refused(server, HEAD + b"Content-Length: 100\r\n\r\nonly ten b", None, half_close=True)


# -- request line and header syntax (RFC 9112 §2-5, RFC 9110 §5) ----------------------------

SYNTAX = {
    # RFC 9112 §2.2: a bare CR MUST be treated as invalid; we also refuse bare LF (allowed, not
    # required, by the same section) so that no front end can disagree on where a line ends.
    "bare-lf-request-line": (b"GET /echo HTTP/1.1\nHost: a\r\n\r\n", {400}),
    "bare-lf-header": (b"GET /echo HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n", {400}),
    "bare-lf-only": (b"GET /echo HTTP/1.1\nHost: a\n\n", {400}),
    "bare-cr-request-line": (b"GET /echo HTTP/1.1\rHost: a\r\n\r\n", {400}),
    "bare-cr-header": (b"GET /echo HTTP/1.1\r\nHost: a\rX-A: b\r\n\r\n", {400}),
    # RFC 9110 §5.5: NUL, CR and other CTLs are not field-value characters.
    "nul-in-header-value": (b"GET /echo HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n", {400}),
    "cr-in-header-value": (b"GET /echo HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n", {400}),
    "del-in-header-value": (b"GET /echo HTTP/1.1\r\nHost: a\r\nX-A: b\x7fc\r\n\r\n", {400}),
    "bel-in-header-value": (b"GET /echo HTTP/1.1\r\nHost: a\r\nX-A: b\x07c\r\n\r\n", {400}),
    # RFC 9110 §5.1: a field name is a token.
    "header-name-trailing-x85": (b"GET /echo HTTP/1.1\r\nHost: a\r\nX-A\x85: b\r\n\r\n", {400}),
    "header-name-trailing-xa0": (b"GET /echo HTTP/1.1\r\nHost: a\r\nX-A\xa0: b\r\n\r\n", {400}),
    "header-name-nul": (b"GET /echo HTTP/1.1\r\nHost: a\r\nX\x00A: b\r\n\r\n", {400}),
    "header-name-space": (b"GET /echo HTTP/1.1\r\nHost: a\r\nX A: b\r\n\r\n", {400}),
    "header-name-slash": (b"GET /echo HTTP/1.1\r\nHost: a\r\nX/A: b\r\n\r\n", {400}),
    "header-name-empty": (b"GET /echo HTTP/1.1\r\nHost: a\r\n: b\r\n\r\n", {400}),
    "header-no-colon": (b"GET /echo HTTP/1.1\r\nHost: a\r\nX-A b\r\n\r\n", {400}),
    "header-obs-fold": (b"GET /echo HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", {400}),
    "leading-whitespace-first-header": (b"GET /echo HTTP/1.1\r\n Host: a\r\n\r\n", {400}),
    # RFC 9110 §9.1: a method is a token; unknown ones may be 501.
    "method-non-token": (b"G@T /echo HTTP/1.1\r\nHost: a\r\n\r\n", {400, 501}),
    "method-colon": (b"GET: /echo HTTP/1.1\r\nHost: a\r\n\r\n", {400, 501}),
    "method-nul": (b"GET\x00 /echo HTTP/1.1\r\nHost: a\r\n\r\n", {400, 501}),
    "method-utf8": (b"GET\xc3\x9f /echo HTTP/1.1\r\nHost: a\r\n\r\n", {400, 501}),
    # RFC 9112 §3: method SP request-target SP HTTP-version, single spaces.
    "request-line-two-spaces": (b"GET  /echo HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    "request-line-trailing-space": (b"GET /echo HTTP/1.1 \r\nHost: a\r\n\r\n", {400}),
    "request-line-tab": (b"GET\t/echo HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    "request-line-no-version": (b"GET /echo\r\nHost: a\r\n\r\n", {400, 505}),
    "target-with-space": (b"GET /ec ho HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    "target-relative": (b"GET echo HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    # RFC 9110 §15.6.6: 505 for a major version we do not speak; malformed versions are 400.
    "version-http-2.0": (b"GET /echo HTTP/2.0\r\nHost: a\r\n\r\n", {400, 505}),
    "version-http-1.1x": (b"GET /echo HTTP/1.1x\r\nHost: a\r\n\r\n", {400}),
    "version-http-0.9": (b"GET /echo HTTP/0.9\r\nHost: a\r\n\r\n", {400, 505}),
    "version-http-1.2": (b"GET /echo HTTP/1.2\r\nHost: a\r\n\r\n", {400, 505}),
    "version-lowercase": (b"GET /echo http/1.1\r\nHost: a\r\n\r\n", {400}),
    "version-ftp": (b"GET /echo FTP/1.1\r\nHost: a\r\n\r\n", {400}),
    # RFC 9112 §3.2: "A server MUST respond with a 400 ... to any HTTP/1.1 request message that
    # lacks a Host header field and to any such message that contains more than one".
    "host-missing-http11": (b"GET /echo HTTP/1.1\r\nX-A: b\r\n\r\n", {400}),
    "host-twice": (b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", {400}),
    "host-twice-same": (b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", {400}),
    # RFC 9110 §6.5.1: fields that frame or route the message are forbidden in trailers.
    "trailer-content-length": (
        CHUNKED + b"5\r\nhello\r\n0\r\nContent-Length: 99\r\n\r\n",
        {400},
    ),
    "trailer-transfer-encoding": (
        CHUNKED + b"5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n",
        {400},
    ),
}


@pytest.mark.parametrize("data,statuses", list(SYNTAX.values()), ids=list(SYNTAX))
def test_malformed_request_refused(server: GunicornServer, data: bytes, statuses: set[int]) -> None:
    assert_refused(server, data, statuses)


# -- size limits (gunicorn's limit_request_* defaults) ------------------------------------------


def test_100kb_request_line_is_414(server: GunicornServer) -> None:
    # RFC 9112 §3: 414 for a request-target longer than the server will parse (4094 by default,
    # gunicorn's limit_request_line).
    data = b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    assert_refused(server, data, {414})


def test_100kb_header_is_431(server: GunicornServer) -> None:
    # RFC 6585 §5: 431 Request Header Fields Too Large (limit_request_field_size, 8190).
    data = b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n"
    assert_refused(server, data, {431})


def test_300_headers_is_431(server: GunicornServer) -> None:
    # limit_request_fields defaults to 100.
    fields = b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(300))
    assert_refused(server, b"GET /echo HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n", {431})


def test_10gb_content_length_is_413_before_the_body(server: GunicornServer) -> None:
    # RFC 9110 §15.5.14: answer 413 at once, without waiting for (or reading) a body that large.
    pid = server.worker_pid()
    mark = server.call_mark()
    head = HEAD + b"Content-Length: 10737418240\r\n\r\n"
    with server.client(timeout=5.0) as client:
        client.send(head)
        response = client.read_response(timeout=3.0)
        assert response.status == 413, response
        assert client.is_closed(3.0), "connection left open after 413"
    server.assert_app_not_called(mark, pid)


# -- environ spoofing -------------------------------------------------------------------------


def _echo(server: GunicornServer, headers: bytes) -> dict[str, object] | None:
    """GET /echo with extra raw header lines; the echo, or None if the server refused (400)."""
    data = b"GET /echo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n" + headers + b"\r\n"
    result = exchange(server.port, data, responses=1)
    assert len(result.responses) == 1, result.raw[:500]
    response = result.responses[0]
    if response.status == 400:
        return None
    assert response.status == 200, result.raw[:500]
    echoed: dict[str, object] = response.json()
    return echoed


@pytest.mark.parametrize(
    "line",
    [b"X_Forwarded_For: 10.9.9.9", b"X_FORWARDED_FOR: 10.9.9.9", b"x_forwarded_for: 10.9.9.9"],
    ids=["mixed-case", "upper", "lower"],
)
def test_underscore_header_not_visible(server: GunicornServer, line: bytes) -> None:
    # CGI maps "-" to "_", so an underscore header would alias X-Forwarded-For (gunicorn drops
    # such headers by default; nginx ignores them).  Dropped or refused, never passed on.
    echoed = _echo(server, line + b"\r\n")
    if echoed is not None:
        headers = echoed["headers"]
        assert isinstance(headers, dict)
        assert "HTTP_X_FORWARDED_FOR" not in headers, headers


@pytest.mark.parametrize(
    "line",
    [b"SCRIPT_NAME: /evil", b"Script-Name: /evil", b"X-Script-Name: /evil"],
    ids=["underscore", "dash", "x-prefixed"],
)
def test_script_name_header_does_not_change_script_name(
    server: GunicornServer, line: bytes
) -> None:
    echoed = _echo(server, line + b"\r\n")
    if echoed is not None:
        assert echoed["script_name"] == "", echoed["script_name"]
        assert echoed["path"] == "/echo", echoed["path"]


@pytest.mark.parametrize(
    "trailer",
    [b"Host: evil.test", b"X-Forwarded-For: 10.9.9.9", b"Script-Name: /evil", b"Cookie: a=b"],
    ids=["host", "x-forwarded-for", "script-name", "cookie"],
)
def test_trailer_fields_never_reach_the_environ(server: GunicornServer, trailer: bytes) -> None:
    # RFC 9110 §6.5.1: a trailer field may not be merged into the header section unless its
    # definition allows it; routing and framing fields never.  Refusing is fine too.
    data = CHUNKED.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1)
    result = exchange(server.port, data + b"5\r\nhello\r\n0\r\n" + trailer + b"\r\n\r\n")
    assert len(result.responses) == 1, result.raw[:500]
    response = result.responses[0]
    assert response.status in (200, 400), result.raw[:500]
    if response.status == 200:
        echo = response.json()
        assert echo["headers"] == {
            "HTTP_HOST": "hostile.test",
            "HTTP_CONNECTION": "close",
            "HTTP_TRANSFER_ENCODING": "chunked",
        } or echo["headers"] == {"HTTP_HOST": "hostile.test", "HTTP_CONNECTION": "close"}, echo
        assert echo["script_name"] == ""
        assert echo["body"] == "hello"


def test_request_pipelined_after_refused_one_is_never_processed(server: GunicornServer) -> None:
    # The second request sits where a front end that used the other Content-Length would see a
    # body: it is exactly what a smuggling attack needs the back end to run.
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    data = HEAD + b"Content-Length: 0\r\nContent-Length: 37\r\n\r\n" + smuggled
    assert_refused(server, data, {400})


def test_request_pipelined_after_bad_chunk_is_never_processed(server: GunicornServer) -> None:
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    assert_refused(server, CHUNKED + b"5_0\r\nhello\r\n0\r\n\r\n" + smuggled, {400})


def test_crlf_in_response_header_is_500_and_never_written(server: GunicornServer) -> None:
    # CWE-113: a header value with CR LF would let request data forge response headers.
    pid = server.worker_pid()
    log_start = len(server.log_text())
    result = exchange(
        server.port, b"GET /bad-header HTTP/1.1\r\nHost: a\r\n\r\n", responses=1, timeout=5.0
    )
    assert len(result.responses) == 1, result.raw[:500]
    assert result.responses[0].status == 500, result.raw[:500]
    assert b"X-Injected" not in result.raw, result.raw[:500]
    assert b"X-Evil" not in result.raw, result.raw[:500]
    assert b"malicious" not in result.raw, result.raw[:500]
    server.wait_for_log(r"(?i)x-evil", timeout=5.0, start=log_start)
    assert server.worker_pid() == pid


# -- slow clients (ASYNC_HANDLER_HEADER_TIMEOUT) --------------------------------------------------


@pytest.fixture(scope="module")
def slow_server() -> Iterator[GunicornServer]:
    with gunicorn_server(CONTRACT_APP, env={"ASYNC_HANDLER_HEADER_TIMEOUT": "1"}) as srv:
        yield srv


def test_slowloris_head_is_cut_off(slow_server: GunicornServer) -> None:
    # One byte every 0.1 s keeps any per-read timer alive forever; the head as a whole must
    # arrive within the header timeout (1 s here), else 408 and a close.
    pid = slow_server.worker_pid()
    mark = slow_server.call_mark()
    start = time.monotonic()
    with slow_server.client(timeout=5.0) as client:
        client.send(b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        closed = False
        while time.monotonic() - start < 5.0 and not closed:
            try:
                client.send(b"a")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            closed = client.is_closed(0.1)
        elapsed = time.monotonic() - start
        closed = closed or client.is_closed(1.0)
        data = bytes(client.received)
    assert closed, f"a head dripped for {elapsed:.1f}s was never cut off"
    assert elapsed < 3.0, f"cut off only after {elapsed:.1f}s (header timeout 1 s)"
    assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data[:200]
    slow_server.assert_app_not_called(mark, pid)


def test_stalled_body_is_cut_off(slow_server: GunicornServer) -> None:
    pid = slow_server.worker_pid()
    mark = slow_server.call_mark()
    start = time.monotonic()
    result = exchange(slow_server.port, HEAD + b"Content-Length: 10\r\n\r\nabc", timeout=5.0)
    elapsed = time.monotonic() - start
    assert result.closed and elapsed < 3.0, (elapsed, result.raw[:200])
    assert result.statuses in ([], [408]), result.raw[:200]
    slow_server.assert_app_not_called(mark, pid)


def test_silent_connection_is_closed(slow_server: GunicornServer) -> None:
    start = time.monotonic()
    result = exchange(slow_server.port, b"", timeout=5.0)
    elapsed = time.monotonic() - start
    assert result.closed and elapsed < 3.0, (elapsed, result.raw[:200])
    assert result.raw == b"", "nothing was asked, so nothing may be answered"
