"""Views of every kind used by the handler tests."""

import asyncio
import contextlib
import gc
import hashlib
import json
import os
import threading
import time
from pathlib import Path

from asgiref.sync import sync_to_async
from django.core.cache.backends.locmem import LocMemCache
from django.core.exceptions import PermissionDenied, SuspiciousOperation
from django.db import connections
from django.http import (
    FileResponse,
    Http404,
    HttpRequest,
    HttpResponse,
    JsonResponse,
    StreamingHttpResponse,
)
from django.template.response import TemplateResponse
from django.views import View

PAYLOAD = Path(__file__).with_name("settings.py")


def csrf_exempt(view):
    """Django's csrf_exempt without its wrapper: before 5.0 the wrapper is a plain function,
    which hides an ``async def`` view's coroutine-ness (Django ticket #31949)."""
    view.csrf_exempt = True
    return view


#: What the cancellation tests inspect.
EVENTS: list[str] = []


def _describe(request, kind):
    files = {
        name: [f.name, f.size, hashlib.sha256(f.read()).hexdigest()]
        for name, f in request.FILES.items()
    }
    data = {
        "kind": kind,
        "method": request.method,
        "path": request.path,
        "GET": {k: request.GET.getlist(k) for k in sorted(request.GET)},
        "POST": {k: request.POST.getlist(k) for k in sorted(request.POST)},
        "FILES": files,
        "COOKIES": dict(sorted(request.COOKIES.items())),
        "content_type": request.content_type,
        "secure": request.is_secure(),
        "host": request.get_host(),
    }
    if request.content_type == "application/json":
        data["json"] = json.loads(request.body or b"null")
    return data


def _raise(kind):
    if kind == "http404":
        raise Http404("no such thing")
    if kind == "permission":
        raise PermissionDenied("not yours")
    if kind == "suspicious":
        raise SuspiciousOperation("smells")
    if kind == "error":
        raise ValueError("boom")
    if kind == "none":
        return None
    return HttpResponse(f"no error {kind}")


# -- sync views


def sync_hello(request):
    _record(request)
    return HttpResponse("Hello, sync world", content_type="text/plain")


@csrf_exempt
def sync_echo(request):
    _record(request)
    return JsonResponse(_describe(request, "sync"))


def sync_template(request):
    return TemplateResponse(request, "page.html", {"greeting": "Hello", "kind": "sync"})


def sync_stream(request):
    def chunks():
        for i in range(5):
            yield f"sync chunk {i}\n"

    return StreamingHttpResponse(chunks(), content_type="text/plain")


def sync_raise(request, kind):
    return _raise(kind)


def sync_sleep(request):
    time.sleep(float(request.GET.get("s", "1")))
    return HttpResponse("slept")


def sync_threads(request):
    _record(request)
    return JsonResponse({"sync_threads": request.sync_threads, "loop": request.loop_thread})


def sync_cookie(request):
    response = HttpResponse("cookie set")
    response.set_cookie("flavour", "oatmeal", max_age=60, httponly=True)
    response.set_cookie("other", "value with space")
    return response


def sync_db(request):
    with connections["pg"].cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    time.sleep(float(request.GET.get("s", "0")))
    with connections["pg"].cursor() as cursor:
        cursor.execute("SELECT 2")
        cursor.fetchone()
    return HttpResponse("db ok")


def file_view(request):
    return FileResponse(open(PAYLOAD, "rb"), as_attachment=True, filename="payload.py")


def csrf_protected(request):
    return HttpResponse(f"csrf passed {request.method}")


def sync_none(request):
    return None


# -- async views


async def async_hello(request):
    return HttpResponse("Hello, async world", content_type="text/plain")


@csrf_exempt
async def async_echo(request):
    return JsonResponse(_describe(request, "async"))


async def async_template(request):
    return TemplateResponse(request, "page.html", {"greeting": "Hello", "kind": "async"})


async def async_stream(request):
    async def chunks():
        for i in range(5):
            await asyncio.sleep(0)
            yield f"async chunk {i}\n"

    return StreamingHttpResponse(chunks(), content_type="text/plain")


async def async_raise(request, kind):
    return _raise(kind)


async def async_sleep(request):
    EVENTS.append(f"started {request.GET.get('tag', '')}")
    try:
        await asyncio.sleep(float(request.GET.get("s", "1")))
    except asyncio.CancelledError:
        EVENTS.append(f"cancelled {request.GET.get('tag', '')}")
        raise
    return HttpResponse("slept")


async def async_threads(request):
    # Sync ORM-style work from an async view: lands on the request's thread too.
    await sync_to_async(_record)(request)
    return JsonResponse(
        {
            "sync_threads": request.sync_threads,
            "loop": request.loop_thread,
            "view": threading.get_ident(),
        }
    )


async def async_db(request):
    await sync_to_async(_db_work)(request)
    return HttpResponse("db ok")


def _db_work(request):
    with connections["pg"].cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


class AsyncCBV(View):
    async def get(self, request):
        return HttpResponse(f"cbv get {request.GET.get('q', '')}")

    async def post(self, request):
        return JsonResponse(_describe(request, "cbv"))


async def async_none(request):
    return None


async def async_cache(request):
    from django.core.cache import caches

    await caches["default"].aget("probe")
    return HttpResponse("cached")


class ClosingCache(LocMemCache):
    """A cache whose close() does something, as memcached's and Redis's do."""

    closed = 0

    def close(self, **kwargs):
        ClosingCache.closed += 1


def custom_404(request, exception):
    return HttpResponse(f"custom 404: {request.path}", status=404)


def custom_500(request):
    return HttpResponse("custom 500", status=500)


def _record(request):
    threads = getattr(request, "sync_threads", None)
    if threads is None:
        threads = request.sync_threads = []
    threads.append(("view", threading.get_ident()))


async def async_stream_probe(request):
    """Records each chunk as it is produced, to prove a stream is not buffered."""

    async def chunks():
        try:
            for i in range(3):
                EVENTS.append(f"produced {i}")
                yield f"chunk {i}\n"
        finally:
            EVENTS.append("generator closed")

    return StreamingHttpResponse(chunks(), content_type="text/plain")


# -- observability for the end-to-end tests (read over HTTP from another process)

SIGNALS = {"started": 0, "finished": 0}


def _count_started(**kwargs):
    SIGNALS["started"] += 1


def _count_finished(**kwargs):
    SIGNALS["finished"] += 1


def connect_counters():
    """Count request signals for /observe/.  Only the server entry point (wsgi.py) connects
    them: a sync receiver costs every in-process request a thread hop."""
    from django.core import signals

    signals.request_started.connect(_count_started, dispatch_uid="djproject-started")
    signals.request_finished.connect(_count_finished, dispatch_uid="djproject-finished")


async def observe(request):
    import os

    from async_handler.protocol import STATS

    return JsonResponse(
        {
            "pid": os.getpid(),
            "signals": SIGNALS,
            "events": EVENTS[-2000:],
            "threads": threading.active_count(),
            "tasks": len(asyncio.all_tasks()),
            "sendfile": dict(STATS),
        }
    )


def big_file(request):
    import os
    import tempfile

    size = int(request.GET.get("mb", "100")) * 1024 * 1024
    path = Path(tempfile.gettempdir()) / f"async-handler-big-{size}.bin"
    if not path.exists() or path.stat().st_size != size:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            block = bytes(range(256)) * 4096
            for _ in range(size // len(block)):
                f.write(block)
        tmp.replace(path)
    return FileResponse(open(path, "rb"))


async def storm_observe(request):
    """``/observe/storm/?prefix=P``: counts of ``started``/``cancelled`` events whose tag starts
    with P (the whole event list, unlike ``/observe/``), plus the ``/observe/`` counters."""
    import os

    prefix = request.GET.get("prefix", "")
    started = sum(1 for e in EVENTS if e.startswith(f"started {prefix}"))
    cancelled = sum(1 for e in EVENTS if e.startswith(f"cancelled {prefix}"))
    return JsonResponse(
        {
            "pid": os.getpid(),
            "started": started,
            "cancelled": cancelled,
            "signals": SIGNALS,
            "threads": threading.active_count(),
            "tasks": len(asyncio.all_tasks()),
        }
    )


async def async_wait(request):
    """``/async/wait/?s=``: sleep on the loop without recording anything (long load runs)."""
    await asyncio.sleep(float(request.GET.get("s", "0.01")))
    return HttpResponse("waited")


async def async_overflow_probe(request):
    """The threads of every sync step of this request: middleware, two sync_to_async calls
    (the second one after an await)."""
    from async_handler.threads import is_overflow_thread

    await sync_to_async(_record)(request)
    await asyncio.sleep(0)
    await sync_to_async(_record)(request)
    overflow = await sync_to_async(is_overflow_thread)()
    return JsonResponse(
        {"sync_threads": request.sync_threads, "loop": threading.get_ident(), "overflow": overflow}
    )


def sync_overflow_probe(request):
    """Where a sync view runs: its thread, and whether that is an overflow thread."""
    from async_handler.threads import is_overflow_thread

    _record(request)
    return JsonResponse({"sync_threads": request.sync_threads, "overflow": is_overflow_thread()})


async def pool_stats(request):
    """The worker's thread pool counters and the names of the live threads."""
    from async_handler.contract import POOL_KEY

    pool = request.environ[POOL_KEY]
    return JsonResponse(
        {
            "size": pool.size,
            "overflow": pool.overflow,
            "threads_started": pool.threads_started,
            "overflow_started": pool.overflow_started,
            "overflow_alive": pool.overflow_alive,
            "overflow_peak": pool.overflow_peak,
            "thread_names": sorted(t.name for t in threading.enumerate()),
        }
    )


async def async_db_sleep(request):
    """A query, an await of ``s`` seconds (where a client may leave), then another query."""
    await sync_to_async(_db_work)(request)
    await asyncio.sleep(float(request.GET.get("s", "0.2")))
    await sync_to_async(_db_work)(request)
    return HttpResponse("db ok")


# -- WebSocket endpoints (async_handler.websocket)

from async_handler.websocket import broadcast, websocket  # noqa: E402


@websocket
async def ws_echo(request, ws):
    """Echo every message back, text as text and binary as binary (the Autobahn target)."""
    await ws.accept()
    async for message in ws:
        await ws.send(message)


@websocket(subprotocols=["chat.v1"])
async def ws_whoami(request, ws):
    """Login required; counts visits in the session (saved by SessionMiddleware on the 101)
    and reports what the middleware set on the handshake request."""
    user = await request.auser()
    if not user.is_authenticated:
        return HttpResponse("login required", status=403)
    visits = await request.session.aget("ws_visits", 0) + 1
    await request.session.aset("ws_visits", visits)
    await ws.accept(headers={"X-WS-View": "whoami"})
    await ws.send_json(
        {
            "user": user.username,
            "visits": visits,
            "subprotocol": ws.subprotocol,
            "loop_thread": getattr(request, "loop_thread", None) is not None,
        }
    )
    async for message in ws:
        await ws.send(message)


@websocket
async def ws_raise(request, ws, when):
    """``when`` = ``before`` (raise before accepting: Django's 500) or ``after`` (close 1011)."""
    if when == "before":
        raise ValueError("raised before accept")
    await ws.accept()
    await ws.receive()
    raise ValueError("raised after accept")


@websocket
async def ws_probe(request, ws, tag):
    """Record the socket's life in EVENTS: started, then ended (returned) or cancelled."""
    await ws.accept()
    EVENTS.append(f"ws started {tag}")
    try:
        async for message in ws:
            if message == "db":
                count = await sync_to_async(_db_roundtrip)()
                await ws.send(f"db {count}")
            else:
                await ws.send(message)
    except asyncio.CancelledError:
        EVENTS.append(f"ws cancelled {tag}")
        raise
    EVENTS.append(f"ws ended {tag}")


def _db_roundtrip():
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return cursor.fetchone()[0]


@websocket
async def ws_chat(request, ws, room):
    """Broadcast every message to the room's group; receive the others'."""
    await ws.accept()
    async with ws.join(f"chat.{room}"):
        await ws.send("joined")
        async for message in ws:
            await broadcast(f"chat.{room}", message)


@websocket
async def ws_group(request, ws, group):
    """Join ``group`` (and the groups named by ``?also=``), then say which worker holds the
    socket (``{"pid": ...}``, sent once the memberships are registered, so a broadcast after
    it reaches this socket); ignore input."""
    await ws.accept()
    async with contextlib.AsyncExitStack() as stack:
        for name in [group, *request.GET.getlist("also")]:
            await stack.enter_async_context(ws.join(name))
        await ws.send_json({"pid": os.getpid()})
        async for _ in ws:
            pass


@csrf_exempt
async def ws_broadcast(request, group):
    """POST ``start``, ``count``, ``size``: broadcast ``count`` messages ``"<seq> <padding>"``
    (``seq`` from ``start``, each ``size`` characters long) to ``group``, in order."""
    start = int(request.POST.get("start", "0"))
    count = int(request.POST.get("count", "1"))
    size = int(request.POST.get("size", "16"))
    for seq in range(start, start + count):
        head = f"{seq} "
        await broadcast(group, head + "x" * max(0, size - len(head)))
    return HttpResponse(f"sent {count}")


#: Requests a view chose to keep past their response (tests/test_cycles.py).
KEPT: list = []


def sync_keep(request):
    """Keeps the request after the response, as a background job or a log handler might."""
    KEPT.append(request)
    return HttpResponse("kept", content_type="text/plain")


async def live_requests(request):
    """How many request objects the collector tracks besides this one: those not yet freed."""
    live = sum(1 for obj in gc.get_objects() if isinstance(obj, HttpRequest)) - 1
    return JsonResponse({"live": live, "kept": len(KEPT), "gc_enabled": gc.isenabled()})
