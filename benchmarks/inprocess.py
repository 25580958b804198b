#!/usr/bin/env python3
"""Measure the Django handlers alone, in one process, with no sockets and no server.

Each case calls a handler back to back, one request at a time, for ``--duration`` seconds, and
reports requests per second and microseconds per request (median over ``--rounds``):

* Django's ``WSGIHandler``, called as a WSGI application;
* Django's ``ASGIHandler``, awaited with a minimal HTTP scope, ``receive`` and ``send``;
* ``AsyncDjangoApplication`` under the server contract (``async_handler.async`` = True, our
  ``ThreadPool`` as ``async_handler.thread_pool``), awaited on an event loop;
* ``AsyncDjangoApplication`` called as a plain WSGI application (its fallback mode).

Every response is checked (status 200, expected body), so a broken handler cannot look fast.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECT = HERE / "project"

HELLO = b"Hello, world!"
PATHS = {"async": "/hello/", "sync": "/hello-sync/"}


def base_environ(path: str) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1:8000",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }


def base_scope(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


class WrongResponse(AssertionError):
    pass


def check(case: str, status: str | int | None, body: bytes) -> None:
    if str(status).split(" ")[0] != "200" or body != HELLO:
        raise WrongResponse(f"{case}: got status {status!r}, body {body[:80]!r}")


@dataclass
class Result:
    case: str
    requests: int
    seconds: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def us(self) -> float:
        return self.seconds / self.requests * 1e6


def timed_sync(case: str, one: Callable[[], None], duration: float) -> Result:
    """Call ``one`` repeatedly for about ``duration`` seconds; check the clock every 50 calls."""
    count = 0
    start = time.perf_counter()
    deadline = start + duration
    while True:
        for _ in range(50):
            one()
        count += 50
        now = time.perf_counter()
        if now >= deadline:
            return Result(case, count, now - start)


async def timed_async(case: str, one: Callable[[], Awaitable[None]], duration: float) -> Result:
    count = 0
    start = time.perf_counter()
    deadline = start + duration
    while True:
        for _ in range(50):
            await one()
        count += 50
        now = time.perf_counter()
        if now >= deadline:
            return Result(case, count, now - start)


def wsgi_caller(case: str, app: Callable[..., Any], path: str) -> Callable[[], None]:
    template = base_environ(path)

    def one() -> None:
        environ = dict(template)
        environ["wsgi.input"] = io.BytesIO(b"")
        seen: list[str] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            seen.append(status)
            return lambda data: None

        body: Iterable[bytes] = app(environ, start_response)
        try:
            data = b"".join(body)
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
        check(case, seen[0] if seen else None, data)

    return one


def contract_caller(
    case: str, app: Callable[..., Any], path: str, pool: Any
) -> Callable[[], Awaitable[None]]:
    from async_handler.contract import ASYNC_KEY, POOL_KEY

    template = base_environ(path)
    template[ASYNC_KEY] = True
    template[POOL_KEY] = pool

    async def one() -> None:
        environ = dict(template)
        environ["wsgi.input"] = io.BytesIO(b"")
        seen: list[str] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            seen.append(status)
            return lambda data: None

        body = await app(environ, start_response)
        try:
            if isinstance(body, (list, tuple)):
                data = b"".join(body)
            elif hasattr(body, "__aiter__"):
                data = b"".join([chunk async for chunk in body])
            else:
                # The contract has the server read other sync iterables off the loop.
                data = await asyncio.to_thread(lambda: b"".join(body))
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
            elif hasattr(body, "close"):
                await asyncio.to_thread(body.close)
        check(case, seen[0] if seen else None, data)

    return one


def asgi_caller(case: str, app: Callable[..., Any], path: str) -> Callable[[], Awaitable[None]]:
    scope = base_scope(path)

    async def one() -> None:
        delivered = False
        never = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": b"", "more_body": False}
            # Django listens for a disconnect while the view runs; the client never leaves.
            await never.wait()
            return {"type": "http.disconnect"}

        status: list[int] = []
        chunks: list[bytes] = []

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await app(dict(scope), receive, send)
        check(case, status[0] if status else None, b"".join(chunks))

    return one


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per case (3)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are shown (3)")
    parser.add_argument(
        "--middleware", choices=["stock", "none"], default="stock", help="middleware stack"
    )
    parser.add_argument("--uvloop", action="store_true", help="run async cases on uvloop")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rounds < 1:
        raise SystemExit("--duration must be > 0 and --rounds >= 1")

    os.environ["BENCH_MIDDLEWARE"] = args.middleware
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchsite.settings"
    sys.path.insert(0, str(PROJECT))
    import django

    django.setup(set_prefix=False)
    from django.core.handlers.asgi import ASGIHandler
    from django.core.handlers.wsgi import WSGIHandler

    from async_handler import AsyncDjangoApplication
    from async_handler.threads import ThreadPool

    django_wsgi = WSGIHandler()
    django_asgi = ASGIHandler()
    ours = AsyncDjangoApplication()
    pool = ThreadPool(8, name="bench-pool")

    sync_cases: dict[str, Callable[[], None]] = {}
    async_cases: dict[str, Callable[[], Awaitable[None]]] = {}
    for view, path in PATHS.items():
        sync_cases[f"django WSGIHandler, {view} view"] = wsgi_caller(
            f"WSGIHandler {view}", django_wsgi, path
        )
        sync_cases[f"ours as plain WSGI, {view} view"] = wsgi_caller(
            f"ours plain WSGI {view}", ours, path
        )
        async_cases[f"django ASGIHandler, {view} view"] = asgi_caller(
            f"ASGIHandler {view}", django_asgi, path
        )
        async_cases[f"ours under contract, {view} view"] = contract_caller(
            f"ours contract {view}", ours, path, pool
        )

    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if args.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    loop = loop_factory()

    results: dict[str, list[Result]] = {}
    warm = min(0.5, args.duration)
    try:
        for case, one in sync_cases.items():
            timed_sync(case, one, warm)
        for case, aone in async_cases.items():
            loop.run_until_complete(timed_async(case, aone, warm))
        for round_no in range(1, args.rounds + 1):
            for case, one in sync_cases.items():
                results.setdefault(case, []).append(timed_sync(case, one, args.duration))
            for case, aone in async_cases.items():
                results.setdefault(case, []).append(
                    loop.run_until_complete(timed_async(case, aone, args.duration))
                )
            print(f"round {round_no}/{args.rounds} done", file=sys.stderr)
    finally:
        loop.close()
        pool.shutdown()

    medians = {case: statistics.median(r.rps for r in rs) for case, rs in results.items()}
    print(
        f"\nIn-process handler cost, middleware={args.middleware}, "
        f"{'uvloop' if args.uvloop else 'asyncio'}, median of {args.rounds} x {args.duration}s\n"
    )
    print(f"{'case':<40} {'req/s':>10} {'us/req':>9}")
    for case, rps in medians.items():
        print(f"{case:<40} {rps:>10.0f} {1e6 / rps:>9.1f}")
    print("\nRatios (ours / Django's, req/s; > 1 means ours is faster):")
    comparisons = [
        ("ours under contract, async view", "django ASGIHandler, async view"),
        ("ours under contract, sync view", "django ASGIHandler, sync view"),
        ("ours under contract, sync view", "django WSGIHandler, sync view"),
        ("ours under contract, async view", "django WSGIHandler, sync view"),
        ("ours as plain WSGI, sync view", "django WSGIHandler, sync view"),
        ("ours as plain WSGI, async view", "django WSGIHandler, async view"),
    ]
    for mine, theirs in comparisons:
        print(f"  {mine:<34} / {theirs:<32} {medians[mine] / medians[theirs]:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
