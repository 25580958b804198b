"""nginx in front of our gunicorn worker: forwarded headers, client address, Host, streaming.

The stack is what a deployment runs: a client talks HTTPS (or HTTP) to Debian's nginx, which
proxies to gunicorn running the montage example with ``AsyncioWorker``.  Three loopback
addresses keep every hop tellable apart:

* the client connects from ``127.0.0.3``;
* nginx connects to gunicorn from ``127.0.0.2`` (``proxy_bind``) and sets
  ``X-Forwarded-Proto $scheme`` and ``X-Forwarded-For``;
* gunicorn trusts those headers only with ``--forwarded-allow-ips 127.0.0.2``; the other
  gunicorns trust ``127.0.0.1`` (a non-matching proxy) or nothing (``''``).

Django then reports ``request.is_secure()`` from ``wsgi.url_scheme`` (no
``SECURE_PROXY_SSL_HEADER`` needed): true only through the TLS listener *and* a trusting
gunicorn.  nginx itself runs from its own prefix folder, in the foreground, on free ports.

The streaming test proves that nothing between the view and the client holds the events back
(the worker flushes each chunk; nginx, told ``X-Accel-Buffering: no``, forwards it).  It cannot
show the header's own effect: nginx 1.22 was seen to forward a trickling chunked response
promptly even with buffering on, so the header is checked at the worker instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from tests._support import free_port, require_program, wait_for_port
from tests.montage_harness import MontageSite
from tests.server import GunicornServer, make_self_signed_cert

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CLIENT_ADDR = "127.0.0.3"
PROXY_ADDR = "127.0.0.2"
HOST = "montage.test"
USER, PASSWORD = "dave", "s3cret-pass-for-dave"

#: gunicorn's --forwarded-allow-ips for each upstream: only "trusted" names nginx's address.
UPSTREAMS = {"trusted": PROXY_ADDR, "mismatch": "127.0.0.1", "empty": ""}


class Nginx:
    """Debian's nginx in the foreground with its own prefix, config, logs and pid file."""

    def __init__(self, binary: str, directory: Path, config: str) -> None:
        self.binary = binary
        self.directory = directory
        self.config_path = directory / "nginx.conf"
        self.config_path.write_text(config)
        self.error_log = directory / "error.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _command(self, *extra: str) -> list[str]:
        # -e: the startup error log too, or nginx first opens the system-wide one.
        return [
            self.binary,
            "-p",
            str(self.directory),
            "-c",
            str(self.config_path),
            "-e",
            str(self.error_log),
            *extra,
        ]

    def start(self, ports: list[int]) -> None:
        """Check the config, start nginx and wait until every listener accepts."""
        test = subprocess.run(
            self._command("-t"), capture_output=True, text=True, timeout=30, check=False
        )
        if test.returncode != 0:
            pytest.fail(f"nginx -t rejected the config:\n{test.stderr}\n{self.config_text()}")
        with (self.directory / "stdout.log").open("ab") as out:
            self.proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        for port in ports:
            if not wait_for_port("127.0.0.1", port, 15.0):
                self.stop()
                pytest.fail(f"nginx did not listen on {port}:\n{self.log_tail()}")

    def stop(self) -> None:
        """Fast shutdown (SIGTERM), then SIGKILL the group after a bound. Idempotent."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def config_text(self) -> str:
        """The config file, for failure messages."""
        return self.config_path.read_text()

    def log_tail(self, lines: int = 40) -> str:
        """The end of nginx's error log."""
        try:
            text = self.error_log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no error log)"
        return "\n".join(text.splitlines()[-lines:])


def nginx_config(
    directory: Path,
    upstreams: dict[str, int],
    listeners: dict[str, tuple[int, str, bool]],
    cert: Path,
    key: str | Path,
) -> str:
    """An nginx.conf proxying each ``listeners[name] = (port, upstream, tls)`` to gunicorn."""
    temp = {kind: directory / kind for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir()
    # nginx started as root drops its workers to an unprivileged user, which could not enter
    # the 0700 temporary folder; keep them as the invoking user instead.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    lines = [
        user,
        "worker_processes 1;",
        "daemon off;",
        f"pid {directory / 'nginx.pid'};",
        f"error_log {directory / 'error.log'} info;",
        "events { worker_connections 256; }",
        "http {",
        f"  access_log {directory / 'access.log'};",
        f"  client_body_temp_path {temp['client_body']};",
        f"  proxy_temp_path {temp['proxy']};",
        f"  fastcgi_temp_path {temp['fastcgi']};",
        f"  uwsgi_temp_path {temp['uwsgi']};",
        f"  scgi_temp_path {temp['scgi']};",
        # The usual reverse-proxy block (nginx docs, "Proxying to a backend"), and WebSocket
        # proxying (nginx docs, "WebSocket proxying"): Upgrade is hop-by-hop, so nginx passes it
        # on only when told to; "" keeps the upstream keep-alive for every other request.
        "  map $http_upgrade $connection_upgrade { default upgrade; '' ''; }",
        f"  proxy_bind {PROXY_ADDR};",
        "  proxy_http_version 1.1;",
        "  proxy_set_header Upgrade $http_upgrade;",
        "  proxy_set_header Connection $connection_upgrade;",
        "  proxy_set_header Host $http_host;",
        "  proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "  proxy_set_header X-Forwarded-Proto $scheme;",
    ]
    for name, port in upstreams.items():
        lines.append(f"  upstream {name} {{ server 127.0.0.1:{port}; keepalive 4; }}")
    for port, upstream, tls in listeners.values():
        lines.append("  server {")
        lines.append(f"    listen 127.0.0.1:{port}{' ssl' if tls else ''};")
        if tls:
            lines.append(f"    ssl_certificate {cert};")
            lines.append(f"    ssl_certificate_key {key};")
        lines.append(f"    location / {{ proxy_pass http://{upstream}; }}")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


class Stack:
    """The running stack: listener name -> base URL, plus the TLS client context."""

    def __init__(
        self, urls: dict[str, str], upstreams: dict[str, str], tls: ssl.SSLContext, nginx: Nginx
    ) -> None:
        self.urls = urls
        self.upstreams = upstreams
        self.tls = tls
        self.nginx = nginx

    def client(self) -> httpx.Client:
        """A client that connects from ``CLIENT_ADDR`` and trusts the test certificate."""
        transport = httpx.HTTPTransport(local_address=CLIENT_ADDR, verify=self.tls)
        return httpx.Client(transport=transport, timeout=10.0)

    def info(self, listener: str, headers: dict[str, str] | None = None) -> dict[str, object]:
        """GET ``/request-info/`` through ``listener``; the montage view's JSON."""
        with self.client() as client:
            response = client.get(
                self.urls[listener] + "/request-info/", headers={"Host": HOST, **(headers or {})}
            )
        assert response.status_code == 200, (response.status_code, response.text[:500])
        data: dict[str, object] = response.json()
        return data


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    nginx_bin = require_program("nginx", "apt-get install nginx")
    openssl = require_program("openssl", "apt-get install openssl")
    with tempfile.TemporaryDirectory(prefix="ah-nginx-") as tmp:
        directory = Path(tmp)
        site = MontageSite(directory)
        site.migrate()
        site.create_superuser(USER, PASSWORD)
        servers: dict[str, GunicornServer] = {}
        nginx: Nginx | None = None
        try:
            for name, allow in UPSTREAMS.items():
                server = site.gunicorn(
                    ["--forwarded-allow-ips", allow],
                    env={"MONTAGE_ALLOWED_HOSTS": f"{HOST},127.0.0.1,localhost"},
                )
                servers[name] = server
                server.start()
            cert, key = make_self_signed_cert(directory, openssl)
            listeners = {
                "https": (free_port(), "trusted", True),
                "http": (free_port(), "trusted", False),
                "https-mismatch": (free_port(), "mismatch", True),
                "https-empty": (free_port(), "empty", True),
            }
            prefix = directory / "nginx"
            prefix.mkdir()
            config = nginx_config(
                prefix, {name: s.port for name, s in servers.items()}, listeners, cert, key
            )
            nginx = Nginx(nginx_bin, prefix, config)
            nginx.start([port for port, _, _ in listeners.values()])
            tls = ssl.create_default_context(cafile=str(cert))
            urls = {
                name: f"{'https' if is_tls else 'http'}://127.0.0.1:{port}"
                for name, (port, _, is_tls) in listeners.items()
            }
            upstreams = {name: server.url for name, server in servers.items()}
            yield Stack(urls, upstreams, tls, nginx)
        finally:
            if nginx is not None:
                nginx.stop()
            for server in servers.values():
                server.cleanup()


def test_trusted_proxy_https_makes_request_secure(stack: Stack) -> None:
    info = stack.info("https")
    assert info["scheme"] == "https"
    assert info["is_secure"] is True
    assert info["x_forwarded_proto"] == "https"


def test_client_address_and_host_through_proxy(stack: Stack) -> None:
    info = stack.info("https")
    # REMOTE_ADDR is the peer gunicorn saw (nginx), never rewritten from X-Forwarded-For;
    # the client's own address travels in X-Forwarded-For.
    assert info["remote_addr"] == PROXY_ADDR
    assert info["x_forwarded_for"] == CLIENT_ADDR
    assert info["host"] == HOST
    assert info["path"] == "/request-info/"


def test_plain_http_listener_is_not_secure_even_if_client_claims_https(stack: Stack) -> None:
    # nginx replaces the client's X-Forwarded-Proto with its own $scheme.
    info = stack.info("http", {"X-Forwarded-Proto": "https"})
    assert info["x_forwarded_proto"] == "http"
    assert info["scheme"] == "http"
    assert info["is_secure"] is False


@pytest.mark.parametrize("listener", ["https-mismatch", "https-empty"])
def test_untrusted_proxy_headers_are_ignored(stack: Stack, listener: str) -> None:
    info = stack.info(listener)
    # The header arrives (Django can see it), but gunicorn did not trust the peer for it.
    assert info["x_forwarded_proto"] == "https"
    assert info["scheme"] == "http"
    assert info["is_secure"] is False
    assert info["remote_addr"] == PROXY_ADDR


def test_event_stream_passes_nginx_unbuffered(stack: Stack) -> None:
    count, interval = 5, 0.5
    # The worker passes the view's header on to nginx (which consumes it, see below).
    with httpx.stream(
        "GET", stack.upstreams["trusted"] + "/events/stream/?count=1&interval=0"
    ) as direct:
        assert direct.headers["x-accel-buffering"] == "no"
        assert direct.headers["cache-control"] == "no-cache"
        direct.read()
    url = stack.urls["http"] + f"/events/stream/?count={count}&interval={interval}"
    arrivals: list[tuple[float, bytes]] = []
    started = time.monotonic()
    with stack.client() as client, client.stream("GET", url, headers={"Host": HOST}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers.get("x-accel-buffering") is None, "nginx consumes the header"
        for chunk in response.iter_raw():
            arrivals.append((time.monotonic() - started, chunk))
    body = b"".join(chunk for _, chunk in arrivals)
    assert body.count(b"event: tick") == count
    assert body.endswith(b'event: done\ndata: {"of": 5}\n\n')
    first_event_at = next(t for t, chunk in arrivals if b"event: tick" in chunk)
    ended_at = arrivals[-1][0]
    # The stream takes (count - 1) * interval = 2 s; buffered, the first event would come last.
    assert ended_at >= (count - 1) * interval * 0.9, arrivals
    assert first_event_at < ended_at - 1.0, (
        f"first event after {first_event_at:.2f}s, stream ended after {ended_at:.2f}s: "
        "nginx buffered the stream"
    )
    assert len(arrivals) >= 3, "events arrived in too few reads to have been streamed"


def test_websocket_through_nginx_over_tls(stack: Stack) -> None:
    """The chat's socket through nginx's TLS listener: the login cookie, the Origin check (which
    needs the scheme from the trusted X-Forwarded-Proto) and the frames all cross the proxy."""
    base = stack.urls["https"]
    with stack.client() as client:
        page = client.get(base + "/chat/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        assert page.status_code == 200 and token is not None, page.text[:500]
        answer = client.post(
            base + "/chat/login/",
            data={"username": USER, "password": PASSWORD, "csrfmiddlewaretoken": token[1]},
            headers={"Referer": base + "/chat/login/"},
        )
        assert answer.status_code == 302, answer.text[:500]
        cookie = "; ".join(f"{name}={value}" for name, value in client.cookies.items())

    async def main() -> tuple[dict[str, str], dict[str, str], str]:
        async with connect(
            base.replace("https://", "wss://") + "/chat/nginx/ws/",
            ssl=stack.tls,
            additional_headers={"Cookie": cookie, "Origin": base},
        ) as ws:
            welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
            joined = json.loads(await asyncio.wait_for(ws.recv(), 10))
            await ws.send("hello through nginx")
            echoed = json.loads(await asyncio.wait_for(ws.recv(), 10))
            return welcome, echoed, joined["type"]

    welcome, echoed, joined = asyncio.run(main())
    assert welcome["type"] == "welcome" and welcome["user"] == USER
    assert joined == "join"
    assert echoed["type"] == "message" and echoed["user"] == USER
    assert echoed["text"] == "hello through nginx"
