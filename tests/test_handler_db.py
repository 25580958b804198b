"""Persistent PostgreSQL connections stay within the pool and are never leaked.

Needs the PostgreSQL server on 127.0.0.1:5432 (database ``test``, trust auth): skips loudly
where it is absent, and fails on CI.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from tests._support import pg_admin_connect
from tests.handler_driver import make_environ, run_async

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_app(django_project):
    """A fresh app whose 'pg' connections carry a unique application_name to count them by."""
    from django.conf import settings
    from django.db import connections

    from async_handler import AsyncDjangoApplication

    admin = pg_admin_connect()
    name = f"ah-{uuid.uuid4().hex[:12]}"
    settings.DATABASES["pg"]["OPTIONS"] = {"application_name": name}
    connections["pg"].settings_dict["OPTIONS"] = {"application_name": name}
    app = AsyncDjangoApplication()

    def count() -> int:
        with admin.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [name])
            return cur.fetchone()[0]

    yield app, count
    app.thread_pool.shutdown(wait=True, timeout=10)
    with admin.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            [name],
        )
    admin.close()


async def _run_many(app, n: int, cancel_every: int | None, sleep: str) -> list:
    async def one(i: int):
        coro = run_async(app, make_environ("GET", "/sync/db/", query=f"s={sleep}"))
        if cancel_every and i % cancel_every == 0:
            task = asyncio.ensure_future(coro)
            await asyncio.sleep(0.01)
            task.cancel()
            try:
                return await task
            except asyncio.CancelledError:
                return "cancelled"
        return await coro

    return await asyncio.gather(*(one(i) for i in range(n)))


def test_500_sync_requests_reuse_at_most_pool_size_connections(pg_app):
    app, count = pg_app
    results = asyncio.run(_run_many(app, 500, None, "0"))
    assert all(r.status == "200 OK" and r.body == b"db ok" for r in results)
    open_connections = count()
    assert 1 <= open_connections <= app.thread_pool.size, open_connections
    # CONN_MAX_AGE=60: a second wave reuses them rather than opening more.
    asyncio.run(_run_many(app, 200, None, "0"))
    assert count() <= app.thread_pool.size


def test_half_cancelled_mid_view_still_within_pool_size(pg_app):
    app, count = pg_app
    results = asyncio.run(_run_many(app, 500, 2, "0.02"))
    cancelled = sum(1 for r in results if r == "cancelled")
    assert cancelled == 250
    assert all(r.body == b"db ok" for r in results if r != "cancelled")
    assert count() <= app.thread_pool.size
    # The cancelled views' threads finish their queries and give the threads back.
    results = asyncio.run(_run_many(app, 50, None, "0"))
    assert all(r.status == "200 OK" for r in results)
    assert count() <= app.thread_pool.size


def test_pool_size_comes_from_the_setting(django_project):
    from django.conf import settings

    from async_handler import AsyncDjangoApplication

    assert AsyncDjangoApplication().thread_pool.size == settings.ASYNC_HANDLER_THREADS
    assert os.environ.get("ASYNC_HANDLER_THREADS", "4") == str(settings.ASYNC_HANDLER_THREADS)


def test_a_transaction_keeps_the_thread(django_project) -> None:
    """The lease's ``keep`` predicate sees an open transaction on the calling thread (on each
    alias), and only there; it is what stops a pool thread being handed to another request
    mid-transaction."""
    import threading

    from django.db import connections, transaction

    from async_handler.handler import _holds_thread_state, _thread_connections

    seen: list[bool] = []
    opened: list[tuple[list[object], list[object]]] = []

    def on_a_pool_like_thread() -> None:
        seen.append(_holds_thread_state())  # no connection opened on this thread yet
        opened.append((_thread_connections(), connections.all(initialized_only=True)))
        for alias in ("default", "pg"):
            with transaction.atomic(using=alias):
                seen.append(_holds_thread_state())
                inside = threading.Thread(target=lambda: seen.append(_holds_thread_state()))
                inside.start()
                inside.join()
            seen.append(_holds_thread_state())
        opened.append((_thread_connections(), connections.all(initialized_only=True)))
        connections.close_all()

    pg_admin_connect().close()  # skips loudly without PostgreSQL
    thread = threading.Thread(target=on_a_pool_like_thread)
    thread.start()
    thread.join()
    assert seen == [False, True, False, False, True, False, False]
    # The fast lookup of this thread's connections agrees with Django's, before and after.
    (none, none_django), (both, both_django) = opened
    assert none == none_django == []
    assert sorted(map(id, both)) == sorted(map(id, both_django)) and len(both) == 2
