"""The request head: llhttp's callbacks on a connection, the checks llhttp does not make, and
the environ.

:class:`RequestHead` is the parsing half of :class:`~async_handler.http.connection.HttpProtocol`:
it collects the request line and fields as ``httptools`` reports them, enforces gunicorn's
limits (414 for a long request line, 431 for too many or too long header fields), checks the
request line, target, ``Host``, framing and trailers (RFC 9112), builds the WSGI environ
(:meth:`RequestHead._build_cycle`) and spools the body.  A refused head is answered by
:meth:`RequestHead._refuse`.

Where it deliberately differs from gunicorn's own parser (all stricter, none looser):

* HTTP/1.1 requests without ``Host`` are refused (RFC 9112 section 3.2); so are two ``Host``
  or two ``Content-Length`` fields, even equal ones, and ``Content-Length`` with
  ``Transfer-Encoding``.
* llhttp accepts only registered methods, ASCII request targets and no whitespace inside chunk
  extensions, and refuses obsolete line folding.  A request line must use single spaces.
  Trailer fields are read and dropped, never merged into the environ; one that RFC 9110
  section 6.5.1 forbids in a trailer (``Host``, framing, authentication) is refused with 400.
* Header names containing ``_`` are always dropped (gunicorn's ``header_map="drop"``).
* A path outside the configured ``SCRIPT_NAME`` is answered 404 (gunicorn answers 500), and
  ``SCRIPT_NAME`` never comes from a request header.
* A client that closes its sending side is treated as gone: its request is cancelled.
"""

from __future__ import annotations

import asyncio
import io
import urllib.parse
from typing import TYPE_CHECKING

import httptools

from ..contract import WEBSOCKET_KEY
from .fields import FORBIDDEN_TRAILERS, BodySpool, Refusal, error_response
from .response import RequestCycle, _Refused
from .sending import FileWrapper
from .websocket import is_handshake, open_handshake

if TYPE_CHECKING:
    from .config import Environ
    from .connection import HttpProtocol


class _StopParsing(Exception):
    """Raised from a parser callback to leave ``feed_data``: no further request is wanted."""


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class RequestHead:
    """Parser callbacks and request-head checks, mixed into the connection.

    The methods take ``self: HttpProtocol`` (the ``misc`` ignores: mypy cannot see through the
    import cycle that the connection subclasses this mixin).
    """

    __slots__ = ()  # the connection declares them

    # per request, while it is being received (set in HttpProtocol.__init__; typed here)
    _receiving: RequestCycle | None
    _in_head: bool
    _head_bytes: int
    _body_bytes: int
    _url: list[bytes]
    _url_size: int
    _headers: list[tuple[bytes, bytes]]
    _fields: int
    _refusal: Refusal | None
    _last_rx: float
    _upgrade_body: RequestCycle | None
    _requests_seen: int
    _header_timer: asyncio.TimerHandle | None
    _idle_timer: asyncio.TimerHandle | None
    _after_upgrade: bytearray | None
    _parse_stopped: bool

    # -- httptools callbacks (called from feed_data; exceptions become parser errors)

    def on_message_begin(self: HttpProtocol) -> None:  # type: ignore[misc]
        """A new request starts: reset per-request parse state, arm the header timer."""
        if self._parse_stopped:
            # Pipelined behind a request after which the connection closes: not processed.
            raise _StopParsing
        self._in_head = True
        self._line_parts = [self._piece]
        self._head_bytes = 0
        self._body_bytes = 0
        self._url = []
        self._url_size = 0
        self._headers = []
        self._fields = 0
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(
                self.config.header_timeout, self._header_timeout
            )

    def on_url(self: HttpProtocol, url: bytes) -> None:  # type: ignore[misc]
        """Collect the request target; enforce ``limit_request_line`` as it grows."""
        self._url.append(url)
        self._url_size += len(url)
        limit = self.config.limit_request_line
        # The whole line is "METHOD SP target SP HTTP/1.1"; count its fixed parts too.
        if limit and self._url_size + len(self.parser.get_method()) + 10 > limit:
            self._fail_parse(414, f"Request line longer than {limit} bytes")

    def on_header(self: HttpProtocol, name: bytes, value: bytes) -> None:  # type: ignore[misc]
        """Collect a header field (or a trailer field, which is counted, checked, dropped)."""
        config = self.config
        self._fields += 1
        limit = config.limit_request_fields
        if limit and self._fields > limit:
            self._fail_parse(431, f"More than {limit} header fields")
        size_limit = config.limit_request_field_size
        # The whole field line, "name: value" and its CRLF, as gunicorn counts it.
        if size_limit and len(name) + len(value) + 4 > size_limit:
            self._fail_parse(431, f"Header field longer than {size_limit} bytes")
        if self._in_head:
            self._headers.append((name, value))
        elif name.lower() in FORBIDDEN_TRAILERS:
            self._fail_parse(400, f"Trailer field {name.decode('latin-1')!r} is forbidden")

    def on_headers_complete(self: HttpProtocol) -> None:  # type: ignore[misc]
        """Validate the head (RFC 9112 strictness beyond llhttp), build the environ, queue."""
        self._in_head = False
        self._requests_seen += 1
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        try:
            cycle = self._build_cycle()
        except Refusal as refusal:
            self._refusal = refusal
            raise
        self._receiving = cycle
        self._cycles.append(cycle)
        if cycle.spool is not None:
            # The slowloris guard continues through the body: each gap between received
            # pieces may last at most header_timeout.
            self._last_rx = self.loop.time()
            self._header_timer = self.loop.call_later(
                self.config.header_timeout, self._body_timeout
            )
        if cycle.continue_pending and self._cycles[0] is cycle:
            cycle.continue_pending = False
            self.transport.write(_CONTINUE)
        if len(self._cycles) > 1:
            # One request runs, this one waits: stop reading until the first is answered.
            self.flow.pause_reading()

    def on_body(self: HttpProtocol, body: bytes) -> None:  # type: ignore[misc]
        """Spool a piece of the (de-chunked) body; a chunked body over the limit is refused."""
        cycle = self._receiving
        if cycle is None or cycle.spool is None:  # pragma: no cover - llhttp framing
            return
        spool = cycle.spool
        limit = self.config.max_body_size
        if limit and spool.size + len(body) > limit:
            self._fail_parse(413, f"Request body larger than {limit} bytes")
        spool.write(body)
        cycle.continue_pending = False

    def on_message_complete(self: HttpProtocol) -> None:  # type: ignore[misc]
        """The body is complete: hand the request to the application when its turn comes."""
        cycle = self._receiving
        if cycle is None:  # pragma: no cover - llhttp calls this after on_headers_complete
            return
        if (
            self.parser.should_upgrade()
            and cycle.spool is not None
            and cycle.spool.size < cycle.declared_length
        ):
            # llhttp hands an upgrade request's body over as "the other protocol" (e.g. curl
            # --http2 POSTs with Upgrade: h2c): read its Content-Length ourselves.
            self._upgrade_body = cycle
            return
        self._complete(cycle)

    def _feed_upgrade_body(self: HttpProtocol, data: bytes) -> None:  # type: ignore[misc]
        cycle = self._upgrade_body
        if cycle is None or cycle.spool is None:  # pragma: no cover - set together
            return
        missing = cycle.declared_length - cycle.spool.size
        cycle.spool.write(data[:missing])
        cycle.continue_pending = False
        if cycle.spool.size >= cycle.declared_length:
            self._upgrade_body = None
            self._complete(cycle)
            self._stop_parsing()

    def _complete(self: HttpProtocol, cycle: RequestCycle) -> None:  # type: ignore[misc]
        self._receiving = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if cycle.spool is not None:
            cycle.environ["wsgi.input"] = cycle.spool.finish()
            if "CONTENT_LENGTH" not in cycle.environ:
                # De-chunked body: give the application its length (PEP 3333 readers rely on
                # CONTENT_LENGTH; wsgi.input_terminated covers the others).
                cycle.environ["CONTENT_LENGTH"] = str(cycle.spool.size)
        cycle.complete = True
        cycle.continue_pending = False
        if self._shutting_down or not cycle.keep_alive:
            self._stop_parsing()
        if self._cycles and self._cycles[0] is cycle:
            self._start(cycle)

    # -- request head validation and environ

    def _set_connection_environ(self: HttpProtocol, transport: asyncio.Transport) -> None:  # type: ignore[misc]
        """The environ keys every request of the connection shares (peer, server, scheme)."""
        config = self.config
        state = self.state
        peer = transport.get_extra_info("peername")
        sockname = transport.get_extra_info("sockname")
        self.peer = peer
        self._scheme = (
            "https"
            if config.is_ssl or transport.get_extra_info("sslcontext") is not None
            else "http"
        )
        env: Environ = {
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": self._scheme,
            "wsgi.errors": state.errors,
            "wsgi.multithread": True,
            "wsgi.multiprocess": config.multiprocess,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
            "wsgi.file_wrapper": FileWrapper,
            "SERVER_SOFTWARE": config.server_software,
            "SCRIPT_NAME": config.script_name,
        }
        if isinstance(peer, tuple):
            env["REMOTE_ADDR"] = str(peer[0])
            env["REMOTE_PORT"] = str(peer[1])
            self._trusted = peer[0] in state.trusted
        else:
            # A Unix-socket peer has no address; gunicorn trusts it for forwarded headers.
            env["REMOTE_ADDR"] = peer if isinstance(peer, str) else ""
            self._trusted = True
        if isinstance(sockname, tuple):
            env["SERVER_NAME"] = str(sockname[0])
            env["SERVER_PORT"] = str(sockname[1])
        else:
            self._unix = True
        self._base_environ = env

    def _fail_parse(self: HttpProtocol, status: int, reason: str) -> None:  # type: ignore[misc]
        self._refusal = Refusal(status, reason)
        raise self._refusal

    def _build_cycle(self: HttpProtocol) -> RequestCycle:  # type: ignore[misc]
        parser = self.parser
        config = self.config
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            if version.startswith("2") or version.startswith("3"):
                raise Refusal(505, f"HTTP version {version} is not supported on HTTP/1 framing")
            raise Refusal(400, f"Invalid HTTP version {version}")
        http10 = version == "1.0"
        raw_method = parser.get_method()
        self._check_request_line(raw_method, version)
        method = raw_method.decode("ascii")
        keep_alive = parser.should_keep_alive() and config.keepalive > 0
        if parser.should_upgrade():
            keep_alive = False
        environ = self._base_environ.copy()
        environ["REQUEST_METHOD"] = method
        environ["SERVER_PROTOCOL"] = "HTTP/1.0" if http10 else "HTTP/1.1"

        host: str | None = None
        hosts = 0
        content_length: str | None = None
        content_type_seen = False
        transfer_encoding: str | None = None
        expect_continue = False
        scheme = self._scheme
        scheme_from: str | None = None
        secure_headers = config.secure_scheme_headers if self._trusted else {}
        for raw_name, raw_value in self._headers:
            name = raw_name.decode("latin-1").upper()
            value = raw_value.decode("latin-1").strip(" \t")
            if name == "HOST":
                hosts += 1
                host = value
            elif name == "CONTENT-LENGTH":
                # llhttp refuses a repeated Content-Length (RFC 9112 section 6.3, item 5).
                content_length = value
                environ["CONTENT_LENGTH"] = value
                continue
            elif name == "CONTENT-TYPE":
                if content_type_seen:
                    # RFC 9110 section 5.3: a singleton field cannot be combined (gunicorn too).
                    raise Refusal(400, "Repeated Content-Type header")
                content_type_seen = True
                environ["CONTENT_TYPE"] = value
                continue
            elif name == "TRANSFER-ENCODING":
                transfer_encoding = (
                    value if transfer_encoding is None else f"{transfer_encoding},{value}"
                )
            elif name == "EXPECT":
                # RFC 9110 section 10.1.1: 100-continue is the only expectation defined; an
                # HTTP/1.0 server must ignore it.
                if value.lower() != "100-continue":
                    raise Refusal(417, f"Unsupported expectation {value!r}")
                expect_continue = not http10
            if name in secure_headers:
                header_scheme = "https" if value == secure_headers[name] else "http"
                if scheme_from is not None and header_scheme != scheme:
                    raise Refusal(400, "Contradictory scheme headers")
                scheme_from = name
                scheme = header_scheme
            if "_" in name:
                # gunicorn header_map="drop": X_Forwarded_For would map to the same key as
                # X-Forwarded-For and let a client smuggle a value past a proxy (RFC 9110
                # section 17.10).
                continue
            key = "HTTP_" + name.replace("-", "_")
            previous = environ.get(key)
            environ[key] = value if previous is None else f"{previous},{value}"
        if hosts > 1:
            raise Refusal(400, "More than one Host header")
        if hosts == 0 and not http10:
            raise Refusal(400, "Missing Host header (required in HTTP/1.1, RFC 9112 section 3.2)")
        environ["wsgi.url_scheme"] = scheme

        chunked = False
        if transfer_encoding is not None:
            codings = [c.strip(" \t").lower() for c in transfer_encoding.split(",")]
            for coding in codings:
                if coding not in ("chunked", "gzip", "x-gzip", "deflate", "compress", "identity"):
                    raise Refusal(501, f"Unsupported transfer coding {coding!r}")
            if codings[-1] != "chunked" or codings.count("chunked") != 1:
                # RFC 9112 section 6.3: a request whose last coding is not chunked has no
                # determinable length.
                raise Refusal(400, "Transfer-Encoding must end with a single 'chunked'")
            if http10:
                # RFC 9112 section 6.1: chunked framing in HTTP/1.0 cannot be trusted.
                raise Refusal(400, "Transfer-Encoding in an HTTP/1.0 request")
            if content_length is not None:
                # RFC 9112 section 6.1: a request smuggling vector; refuse and close.
                raise Refusal(400, "Both Content-Length and Transfer-Encoding")
            if len(codings) > 1:
                # Like gunicorn: a content coding under chunked passes through, but the
                # connection is not reused.
                keep_alive = False
            chunked = True
        length = 0
        if content_length is not None:
            length = int(content_length)  # llhttp accepted only digits
            limit = config.max_body_size
            if limit and length > limit:
                raise Refusal(
                    413, f"Request body of {length} bytes exceeds the limit of {limit} bytes"
                )

        raw_uri = b"".join(self._url)
        environ["RAW_URI"] = raw_uri.decode("latin-1")
        path, query = self._split_target(raw_uri, method)
        environ["QUERY_STRING"] = query
        if self._unix:
            self._server_from_host(environ, host, scheme)
        script_name = config.script_name
        if script_name:
            if path != script_name and not path.startswith(script_name + "/"):
                raise Refusal(404, f"Path is outside SCRIPT_NAME {script_name!r}")
            path = path[len(script_name) :]
        environ["PATH_INFO"] = (
            urllib.parse.unquote_to_bytes(path).decode("latin-1") if "%" in path else path
        )

        has_body = chunked or length > 0
        spool = BodySpool(config.spool_threshold) if has_body else None
        environ["wsgi.input"] = io.BytesIO()
        if chunked and parser.should_upgrade():
            # llhttp would pass the chunked body on undecoded as the upgraded protocol.
            raise Refusal(400, "Upgrade request with a chunked body")
        if self._async_app and is_handshake(environ.get("HTTP_UPGRADE")):
            if has_body:
                raise Refusal(400, "A WebSocket handshake has no body (RFC 6455 section 4.1)")
            environ[WEBSOCKET_KEY] = open_handshake(
                raw_uri,
                self._headers,
                config=config.websocket,
                transport=self.transport,
                flow=self.flow,
                log=self.log,
                server_header=self.state.server_name,
            )
            self._after_upgrade = bytearray()
        cycle = RequestCycle(self, environ, method, http10, keep_alive, spool)
        cycle.continue_pending = expect_continue and has_body
        cycle.declared_length = length
        return cycle

    def _check_request_line(self: HttpProtocol, method: bytes, version: str) -> None:  # type: ignore[misc]
        # RFC 9112 section 3: request-line = method SP request-target SP HTTP-version, with
        # single spaces.  llhttp tolerates runs of spaces; a proxy in front may split such a
        # line differently, so require the exact form to appear in what was received.
        line = b"%s %s HTTP/%s\r\n" % (method, b"".join(self._url), version.encode("ascii"))
        parts = self._line_parts
        received = parts[0].tobytes() if len(parts) == 1 else b"".join(parts)
        if line not in received:
            raise Refusal(
                400, "Malformed request line (single spaces required, RFC 9112 section 3)"
            )
        self._line_parts = []

    @staticmethod
    def _split_target(target: bytes, method: str) -> tuple[str, str]:
        text = target.decode("latin-1")
        if text.startswith("/"):
            text = text.split("#", 1)[0]
            path, _, query = text.partition("?")
            return path, query
        if text == "*" and method != "OPTIONS":
            # RFC 9112 section 3.2.4: asterisk-form is only for a server-wide OPTIONS.
            raise Refusal(400, "Asterisk-form target with a method other than OPTIONS")
        if text == "*" or method == "CONNECT":
            # asterisk-form and authority-form (RFC 9112 sections 3.2.3, 3.2.4) have no path.
            return ("*" if text == "*" else ""), ""
        # absolute-form (RFC 9112 section 3.2.2): the path and query are the request's.
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            raise Refusal(400, "Invalid absolute-form request target") from None
        if url.schema is None or url.schema.lower() not in (b"http", b"https"):
            raise Refusal(400, "Absolute-form request target without an http(s) scheme")
        path = (url.path or b"/").decode("latin-1")
        query = (url.query or b"").decode("latin-1")
        return path, query

    @staticmethod
    def _server_from_host(environ: Environ, host: str | None, scheme: str) -> None:
        # A Unix socket has no address: like gunicorn, take SERVER_NAME/PORT from Host.
        if not host:
            environ["SERVER_NAME"] = ""
            environ["SERVER_PORT"] = ""
            return
        if host.startswith("["):  # IPv6 literal (RFC 3986 section 3.2.2)
            end = host.find("]") + 1
            name, rest = host[:end], host[end:]
            port = rest[1:] if rest.startswith(":") else ""
        else:
            name, _, port = host.partition(":")
        environ["SERVER_NAME"] = name
        environ["SERVER_PORT"] = port or ("443" if scheme == "https" else "80")

    def _refuse(self: HttpProtocol, status: int, reason: str) -> None:  # type: ignore[misc]
        """Answer ``status`` with ``reason`` after the requests before it; then close."""
        self._refusal = None
        self._stop_parsing()
        self._in_head = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self.log.warning("Invalid request from %s: %s %s", self._peer_text(), status, reason)
        self._upgrade_body = None
        receiving = self._receiving
        if receiving is not None:
            self._receiving = None
            if receiving in self._cycles and receiving.task is None:
                self._cycles.remove(receiving)
                receiving.close_input()
        state = self.state
        self._cycles.append(
            _Refused(error_response(status, reason, state.date.line(), state.server_header))
        )
        if len(self._cycles) == 1:
            self._next()
