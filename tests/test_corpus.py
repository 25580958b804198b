"""Replay gunicorn's request corpus (``../shared/corpus/gunicorn-requests/``) against the worker.

Each case's exact bytes go over a real socket to a real gunicorn running our worker and the
contract test app, which echoes whatever reaches it.  Valid requests must reach the app with the
method, path, query, headers and body the manifest lists; invalid ones must be refused (4xx/5xx or
a close) without reaching the app.

One gunicorn at default settings serves the whole module; cases that need other settings run on
one more server per distinct setting set, when the worker honours the setting.  Where we
deliberately differ from gunicorn, :data:`DIFFERENCES` names the case, what we do instead and the
RFC section that allows or requires it, and a test checks exactly that.  One difference covers
many cases: an HTTP/1.1 request without ``Host`` is refused (RFC 9112 §3.2), so such valid cases
are replayed twice, as they are (expecting 400) and with a ``Host`` line added (expecting the
manifest's parse).  The counts are printed at the end of the module.

The corpus is read in place (never copied); without ``../shared`` the tests are skipped loudly
(and fail on CI).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote_to_bytes

import pytest

from tests._support import SHARED, require_shared
from tests.server import CONTRACT_APP, GunicornServer, Response, exchange

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]

CORPUS = SHARED / "corpus" / "gunicorn-requests"
MANIFEST = CORPUS / "manifest.json"

# gunicorn settings the worker honours, as command-line options.
SETTING_OPTIONS: dict[str, str] = {
    "limit_request_line": "--limit-request-line",
    "limit_request_fields": "--limit-request-fields",
    "limit_request_field_size": "--limit-request-field_size",
    "forwarded_allow_ips": "--forwarded-allow-ips",
}

# Errors that mean "the message was incomplete": the client half-closes so the server sees EOF
# instead of waiting for its header timeout.
INCOMPLETE_ERRORS = {"NoMoreData", "ChunkMissingTerminator"}

HOST_RULE = (
    "RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without a Host header "
    "(gunicorn accepts it)"
)


Requests = list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Difference:
    """A case where we deliberately do not do what gunicorn does."""

    outcome: str  # "refused" or "served"
    reason: str
    #: For "served": maps the manifest's requests (empty for invalid cases) to those our worker
    #: hands to the app; None keeps the manifest's.
    served: Callable[[Requests], Requests] | None = None


def _request(
    method: str,
    path: str,
    query: str,
    version: tuple[int, int],
    headers: list[list[str]],
    body: str,
) -> dict[str, Any]:
    return {
        "method": method,
        "uri": {"raw": path, "path": path, "query": query, "fragment": ""},
        "version": list(version),
        "headers": headers,
        "body": body,
        "trailers": [],
    }


def _served_040(_: Requests) -> Requests:
    return [
        _request(
            "GET", "/keep/same/as", "invalid/040", (1, 0), [["CONTENT-LENGTH", "7"]], "tricked"
        )
    ]


def _no_path(requests: Requests) -> Requests:
    return [{**r, "uri": {**r["uri"], "path": "", "query": ""}} for r in requests]


def _one(request: dict[str, Any]) -> Callable[[Requests], Requests]:
    return lambda _: [request]


_OBS_FOLD = (
    "permit_obsolete_folding is not supported: RFC 9112 §5.2 lets a server reject obs-fold with 400"
)
_PROXY = (
    "proxy_protocol is not supported (HAProxy PROXY protocol spec, not an RFC): the PROXY "
    "preamble is not an HTTP request line (RFC 9112 §3), so it is refused with 400"
)

DIFFERENCES: dict[str, Difference] = {
    "valid/009": Difference(
        "refused",
        "Content-Length with Transfer-Encoding is refused: RFC 9112 §6.1 lets a server reject "
        "such a request, and it is the classic smuggling vector (gunicorn 27 refuses it too)",
    ),
    "valid/013": Difference(
        "refused",
        "whitespace around ';' in chunk extensions is refused: RFC 9112 §7.1.1 allows it only "
        "for compatibility (BWS), llhttp's strict mode refuses it, and lax chunk-extension "
        "parsing is a known smuggling vector (CVE-2023-37276, CVE-2024-52304)",
    ),
    "valid/027": Difference(
        "refused",
        "raw non-ASCII bytes in the request-target are refused: a target is a URI (RFC 9112 "
        "§3.2, RFC 3986 §2), where such octets must be %-encoded (gunicorn 27 refuses it too)",
    ),
    "valid/028": Difference(
        "refused",
        "strip_header_spaces is not supported: RFC 9112 §5.1 says a server MUST reject a field "
        "with whitespace between its name and the colon (400)",
    ),
    "valid/031": Difference(
        "refused",
        "methods outside llhttp's registry are refused (RFC 9110 §9.1 lets a server refuse a "
        "method it does not implement)",
    ),
    "valid/031compat": Difference(
        "refused",
        "permit_unconventional_http_method/casefold_http_method are not supported: methods are "
        "case-sensitive tokens (RFC 9110 §9.1) and we never rewrite them",
    ),
    "valid/031compat2": Difference(
        "refused",
        "permit_unconventional_http_method is not supported (RFC 9110 §9.1 lets a server refuse "
        "a method it does not implement)",
    ),
    "valid/040_compat": Difference(
        "served",
        "header_map=dangerous is not supported: header names with '_' are always dropped, since "
        "CGI maps '-' to '_' and they would alias other fields (RFC 3875 §4.1.18)",
        _served_040,
    ),
    "valid/compat_obs_fold": Difference("refused", _OBS_FOLD),
    "valid/compat_obs_fold_huge": Difference("refused", _OBS_FOLD),
    "valid/pp_03": Difference(
        "served",
        "proxy_protocol is not supported; this case sends no PROXY preamble, so it is an "
        "ordinary request (RFC 9112 §3) and is served at default settings",
    ),
    "valid/rfc9112_target_authority_connect_01": Difference(
        "served",
        "authority-form (CONNECT) has no path, so PATH_INFO is empty (RFC 9112 §3.2.3; "
        "gunicorn's '443' is urlsplit reading 'example.com:' as a scheme); RAW_URI has the target",
        _no_path,
    ),
    "valid/rfc9112_target_authority_ipv6_01": Difference(
        "served",
        "authority-form (CONNECT) has no path, so PATH_INFO is empty (RFC 9112 §3.2.3)",
        _no_path,
    ),
    "invalid/013": Difference(
        "refused",
        "permit_obsolete_folding is not supported, so this obs-fold request is refused at "
        "default settings (RFC 9112 §5.2) rather than by the field size limit",
    ),
    "invalid/040": Difference(
        "served",
        "header_map=refuse is not supported: header names with '_' are dropped, never refused "
        "(gunicorn's default, 'drop'; RFC 3875 §4.1.18 mapping)",
        _served_040,
    ),
    "invalid/chunked_07": Difference(
        "served",
        "header_map=refuse is not supported: 'Transfer_Encoding' is dropped, so the message is "
        "framed by its one real Transfer-Encoding (RFC 9112 §6.1)",
        _one(
            _request(
                "POST",
                "/chunked_ambiguous_header_mapping",
                "",
                (1, 1),
                [["TRANSFER-ENCODING", "chunked"]],
                "hello world",
            )
        ),
    ),
}
for _name in ("pp_01", "pp_02", "pp_04", "pp_05"):
    DIFFERENCES[f"valid/{_name}"] = Difference("refused", _PROXY)
for _name in ("pp_01", "pp_02", "pp_03"):
    DIFFERENCES[f"invalid/{_name}"] = Difference(
        "refused", "proxy_protocol is not supported; " + _PROXY.split(": ", 1)[1]
    )


def _fit_content_length(raw: bytes, requests: Requests) -> tuple[bytes, Requests]:
    """Set a one-request case's Content-Length to the length of the body it holds."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = [
        b"Content-Length: %d" % len(body) if line.lower().startswith(b"content-length:") else line
        for line in head.split(b"\r\n")
    ]
    fixed = [
        {
            **r,
            "headers": [
                [n, str(len(body)) if n == "CONTENT-LENGTH" else v] for n, v in r["headers"]
            ],
        }
        for r in requests
    ]
    return b"\r\n".join(lines) + sep + body, fixed


#: Cases whose bytes cannot be replayed as they are, the reason, and the repair.
CORPUS_FIXUPS: dict[str, tuple[str, Callable[[bytes, Requests], tuple[bytes, Requests]]]] = {
    "valid/099": (
        "its Content-Length (17914) exceeds the 8599 body bytes the file holds (gunicorn's test "
        "reader stops at end of file); replayed with the true length",
        _fit_content_length,
    ),
}


def case_bytes(case: dict[str, Any]) -> tuple[bytes, Requests]:
    """The request bytes of ``case`` and the requests they hold, repaired where
    :data:`CORPUS_FIXUPS` says so."""
    raw = (CORPUS / case["file"]).read_bytes()
    requests = list(case.get("expected_requests") or [])
    fixup = CORPUS_FIXUPS.get(case_id(case))
    return fixup[1](raw, requests) if fixup else (raw, requests)


def _load_cases() -> list[dict[str, Any]]:
    if not MANIFEST.exists():
        return []
    cases: list[dict[str, Any]] = json.loads(MANIFEST.read_text("utf-8"))["cases"]
    return cases


CASES = _load_cases()
_OUTCOMES: collections.Counter[str] = collections.Counter()


def case_id(case: dict[str, Any]) -> str:
    """``valid/001``, ``invalid/chunked_03``..."""
    return f"{case['kind']}/{case['name']}"


def _settings_args(case: dict[str, Any]) -> tuple[str, ...] | None:
    """gunicorn options for the case's settings; None if one of them is not supported."""
    args: list[str] = []
    for name, value in case["gunicorn_config"].items():
        option = SETTING_OPTIONS.get(name)
        if option is None:
            return None
        if isinstance(value, list):
            value = ",".join(value)
        args += [option, str(value)]
    return tuple(args)


def _lacks_host(request: dict[str, Any]) -> bool:
    return tuple(request["version"]) == (1, 1) and not any(
        name == "HOST" for name, _ in request["headers"]
    )


def _with_host(raw: bytes, requests: list[dict[str, Any]]) -> bytes:
    """Insert ``Host: corpus.test`` after each HTTP/1.1 request line that has no Host."""
    out = bytearray()
    pos = 0
    for request in requests:
        version = request["version"]
        line = (
            f"{request['method']} {request['uri']['raw']} HTTP/{version[0]}.{version[1]}"
        ).encode("latin-1")
        start = raw.index(line, pos)
        end = raw.index(b"\n", start) + 1
        out += raw[pos:end]
        if _lacks_host(request):
            out += b"Host: corpus.test\r\n"
        pos = end
    out += raw[pos:]
    return bytes(out)


def _expected_with_host(request: dict[str, Any]) -> dict[str, Any]:
    if not _lacks_host(request):
        return request
    return {**request, "headers": [*request["headers"], ["HOST", "corpus.test"]]}


# -- servers: one per distinct setting set, started lazily, shared by the whole module ----------


class Servers:
    """Module-wide gunicorn servers keyed by their extra options (default settings: ``()``)."""

    def __init__(self) -> None:
        self._servers: dict[tuple[str, ...], GunicornServer] = {}

    def get(self, args: tuple[str, ...] = ()) -> GunicornServer:
        """The server started with ``args``; starts it on first use."""
        server = self._servers.get(args)
        if server is None:
            server = GunicornServer(CONTRACT_APP, args)
            self._servers[args] = server
            server.start()
        return server

    def close(self) -> None:
        """Stop every server."""
        for server in self._servers.values():
            server.cleanup()


@pytest.fixture(scope="module")
def servers(request: pytest.FixtureRequest) -> Iterator[Servers]:
    require_shared("corpus", "gunicorn-requests", "manifest.json")
    pool = Servers()
    try:
        pool.get()
        yield pool
    finally:
        pool.close()
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None and _OUTCOMES:
            summary = ", ".join(f"{k}: {v}" for k, v in sorted(_OUTCOMES.items()))
            # Teardown output is captured; the counts belong on the terminal.
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"\ngunicorn request corpus: {summary}")


# -- assertions -----------------------------------------------------------------------------------


def _field_values(value: str) -> list[str]:
    """A field value split into list members, so that "a, b" and "a,b" compare equal."""
    return [part.strip() for part in value.split(",")]


def assert_echo_matches(response: Response, expected: dict[str, Any], where: str) -> None:
    """The app's echo of one request equals the manifest's parse of it."""
    assert response.status == 200, f"{where}: {response.status} {response.body[:300]!r}"
    echo = response.json()
    uri = expected["uri"]
    version = expected["version"]
    assert echo["method"] == expected["method"], where
    # PEP 3333: PATH_INFO is the %-decoded path, bytes shown as latin-1.
    path = unquote_to_bytes(uri["path"].encode("latin-1")).decode("latin-1")
    assert echo["path"] == path, where
    assert echo["query"] == uri["query"], where
    assert echo["protocol"] == f"HTTP/{version[0]}.{version[1]}", where
    assert echo["script_name"] == "", where

    merged: dict[str, list[str]] = {}
    content_length = content_type = None
    for name, value in expected["headers"]:
        if name == "CONTENT-LENGTH":
            content_length = value
        elif name == "CONTENT-TYPE":
            content_type = value
        else:
            merged.setdefault("HTTP_" + name.replace("-", "_"), []).append(value)
    expected_headers = {k: _field_values(", ".join(v)) for k, v in merged.items()}
    chunked = expected_headers.pop("HTTP_TRANSFER_ENCODING", None)
    got_headers = {k: _field_values(v) for k, v in echo["headers"].items()}
    got_te = got_headers.pop("HTTP_TRANSFER_ENCODING", None)
    assert got_headers == expected_headers, where
    # The worker spools and de-chunks the body, so it may replace Transfer-Encoding by a
    # Content-Length; if it passes either on, the value must be right.
    if chunked is not None:
        assert got_te in (None, chunked), where
        assert echo["content_length"] in (None, "", str(len(expected["body"]))), where
    else:
        assert got_te is None, where
        assert echo["content_length"] in (
            (content_length,) if content_length is not None else (None, "", "0")
        ), where
    assert echo["content_type"] in ((content_type,) if content_type else (None, "")), where
    assert echo["body"] == expected["body"], where


def replay_valid(
    server: GunicornServer, raw: bytes, requests: list[dict[str, Any]], where: str
) -> None:
    """Send ``raw``; every expected request reaches the app in order, nothing else does."""
    pid = server.worker_pid()
    mark = server.call_mark()
    result = exchange(server.port, raw, responses=len(requests), timeout=5.0)
    finals = [r for r in result.responses if r.status >= 200]
    assert len(finals) == len(requests), f"{where}: got {result.raw[:600]!r}"
    for i, (response, expected) in enumerate(zip(finals, requests, strict=True)):
        assert_echo_matches(response, expected, f"{where} request {i + 1}")
    last = requests[-1]
    connection = [v.lower() for n, v in last["headers"] if n == "CONNECTION"]
    if "close" in connection or (
        tuple(last["version"]) == (1, 0) and "keep-alive" not in connection
    ):
        assert result.closed, f"{where}: connection not closed after the last response"
    assert server.worker_pid() == pid, where
    calls = server.calls_since(mark)
    assert [c.split(" ", 1)[0] for c in calls] == [r["method"] for r in requests] + ["GET"], (
        f"{where}: app calls {calls!r}"
    )


def replay_refused(
    server: GunicornServer, raw: bytes, where: str, *, half_close: bool = False
) -> None:
    """Send ``raw``; a 4xx/5xx or a close, the connection closed, the app never called."""
    pid = server.worker_pid()
    mark = server.call_mark()
    result = exchange(server.port, raw, timeout=5.0, half_close=half_close)
    finals = [r for r in result.responses if r.status >= 200]
    assert result.closed, f"{where}: connection left open; got {result.raw[:600]!r}"
    assert len(finals) <= 1, f"{where}: got {result.raw[:600]!r}"
    assert all(r.status >= 400 for r in finals), f"{where}: got {result.raw[:600]!r}"
    server.assert_app_not_called(mark, pid)


# -- the tests ----------------------------------------------------------------------------------


def _cases(predicate: Callable[[dict[str, Any]], bool]) -> list[Any]:
    return [pytest.param(c, id=case_id(c)) for c in CASES if predicate(c)]


def _plain_valid(case: dict[str, Any]) -> bool:
    return case["kind"] == "valid" and case_id(case) not in DIFFERENCES


def _plain_invalid(case: dict[str, Any]) -> bool:
    return case["kind"] == "invalid" and case_id(case) not in DIFFERENCES


def test_corpus_present() -> None:
    """The corpus exists where the project expects it (skips loudly, fails on CI)."""
    require_shared("corpus", "gunicorn-requests", "manifest.json")
    assert len(CASES) > 100, "the manifest lists fewer cases than gunicorn's corpus holds"


def _add_missing_hosts(raw: bytes, requests: Requests) -> tuple[bytes, Requests]:
    """Add ``Host`` to HTTP/1.1 requests that lack it (we refuse those: RFC 9112 §3.2)."""
    if not any(_lacks_host(r) for r in requests):
        return raw, requests
    return _with_host(raw, requests), [_expected_with_host(r) for r in requests]


@pytest.mark.parametrize("case", _cases(_plain_valid))
def test_valid_request_reaches_app(servers: Servers, case: dict[str, Any]) -> None:
    args = _settings_args(case)
    assert args is not None, f"{case_id(case)} needs an unsupported setting: add a Difference"
    server = servers.get(args)
    # Replayed with a Host header added where it lacks one; the next test sends it as it is.
    raw, requests = _add_missing_hosts(*case_bytes(case))
    replay_valid(server, raw, requests, case_id(case))
    _OUTCOMES["valid passed"] += 1


@pytest.mark.parametrize(
    "case", _cases(lambda c: _plain_valid(c) and _lacks_host(c["expected_requests"][0]))
)
def test_valid_http11_request_without_host_is_400(servers: Servers, case: dict[str, Any]) -> None:
    """Deliberate difference (RFC 9112 §3.2): gunicorn serves these; we answer 400."""
    args = _settings_args(case)
    assert args is not None
    server = servers.get(args)
    raw, _ = case_bytes(case)
    pid = server.worker_pid()
    mark = server.call_mark()
    result = exchange(server.port, raw, timeout=5.0)
    assert [r.status for r in result.responses] == [400], f"{HOST_RULE}; got {result.raw[:400]!r}"
    assert result.closed
    server.assert_app_not_called(mark, pid)
    _OUTCOMES["deliberate differences (RFC 9112 §3.2, no Host)"] += 1


@pytest.mark.parametrize("case", _cases(_plain_invalid))
def test_invalid_request_refused(servers: Servers, case: dict[str, Any]) -> None:
    args = _settings_args(case)
    assert args is not None, f"{case_id(case)} needs an unsupported setting: add a Difference"
    server = servers.get(args)
    raw, _ = case_bytes(case)
    half_close = case["expected_error"] in INCOMPLETE_ERRORS
    replay_refused(server, raw, case_id(case), half_close=half_close)
    _OUTCOMES["invalid refused"] += 1


@pytest.mark.parametrize("case", _cases(lambda c: case_id(c) in DIFFERENCES))
def test_deliberate_difference(servers: Servers, case: dict[str, Any]) -> None:
    """Cases where we deliberately differ from gunicorn: we do what DIFFERENCES says."""
    difference = DIFFERENCES[case_id(case)]
    server = servers.get()
    raw, requests = case_bytes(case)
    where = f"{case_id(case)} ({difference.reason})"
    if difference.outcome == "refused":
        replay_refused(server, raw, where)
    else:
        if difference.served is not None:
            requests = difference.served(requests)
        raw, requests = _add_missing_hosts(raw, requests)
        replay_valid(server, raw, requests, where)
    _OUTCOMES["deliberate differences (listed in DIFFERENCES)"] += 1


def test_every_difference_names_a_corpus_case() -> None:
    require_shared("corpus", "gunicorn-requests", "manifest.json")
    names = {case_id(c) for c in CASES}
    assert set(DIFFERENCES) <= names, set(DIFFERENCES) - names
    for name, difference in DIFFERENCES.items():
        assert difference.outcome in ("refused", "served"), name
        assert "RFC" in difference.reason or "spec" in difference.reason, name
