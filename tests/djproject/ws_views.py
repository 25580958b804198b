"""WebSocket lifecycle probes for the end-to-end tests (tests/test_websocket_lifecycle.py).

Events go to the server's event log (``TEST_APP_EVENT_LOG``, read by the test process from the
file), not over HTTP: an observing request would fire the very signals the tests count.
"""

import asyncio
import contextvars
import gc
import hashlib
import os
import threading

from async_handler.websocket import WebSocketDisconnect, websocket
from tests.apps.common import log_event

# The path of the request whose code runs in this context: set by request_started's receiver
# (sync receivers run through run_sync, which copies context changes back to the request's
# task), read by request_finished's, which runs in a copy of that task's context.
_request_path: contextvars.ContextVar[str] = contextvars.ContextVar("request_path", default="")

#: Only requests under this prefix are logged (the soak's sockets are not: the log would grow).
LOGGED_PREFIX = "/ws/life/"


def _started(environ=None, **kwargs):
    _request_path.set((environ or {}).get("PATH_INFO", ""))


def _finished(**kwargs):
    path = _request_path.get()
    if path.startswith(LOGGED_PREFIX):
        log_event(f"finished {path}")


def connect_lifecycle_log():
    """Log ``finished <path>`` for each request_finished of a /ws/life/ request.  Only the
    server entry point (wsgi.py) connects it, as views.connect_counters."""
    from django.core import signals

    signals.request_started.connect(_started, dispatch_uid="djproject-life-started")
    signals.request_finished.connect(_finished, dispatch_uid="djproject-life-finished")


@websocket
async def ws_life(request, ws, tag):
    """Log the socket's life: ``open``, then ``disconnect <code>`` (receive() raised
    WebSocketDisconnect) or ``cancelled <code>`` (the view was cancelled), then ``returned``.

    Messages: ``sleep`` logs ``sleeping`` and awaits 60 s (a long await that is not receive());
    anything else is echoed.
    """
    await ws.accept()
    log_event(f"open {tag}")
    try:
        while True:
            try:
                message = await ws.receive()
            except WebSocketDisconnect as exc:
                log_event(f"disconnect {tag} {exc.code}")
                break
            if message == "sleep":
                log_event(f"sleeping {tag}")
                await asyncio.sleep(60)
                log_event(f"woke {tag}")
            else:
                await ws.send(message)
    except asyncio.CancelledError:
        log_event(f"cancelled {tag} {ws.close_code}")
        raise
    log_event(f"returned {tag}")


@websocket
async def ws_flow(request, ws, tag):
    """Flow-control probes (tests/test_websocket_flow.py), by ``?mode=``:

    * ``accept_after=S``: sleep S seconds before accepting (the open timeout);
    * ``hold=S``: after accepting, read nothing for S seconds, then read every message up to the
      text ``end`` and answer ``{"count": n, "sha256": ...}`` of their bytes (reading pauses);
    * ``flood=N&size=B``: send N binary messages of B bytes, message i starting with i on 4
      bytes, logging ``sent <tag> <i>`` as each send returns (send waits for the client).
    """
    query = request.GET
    try:
        if "accept_after" in query:
            await asyncio.sleep(float(query["accept_after"]))
        await ws.accept()
    except asyncio.CancelledError:
        log_event(f"cancelled {tag} before accept")
        raise
    log_event(f"open {tag}")
    if "hold" in query:
        await asyncio.sleep(float(query["hold"]))
        log_event(f"reading {tag}")
        digest, count = hashlib.sha256(), 0
        while (message := await ws.receive()) != "end":
            digest.update(message)
            count += 1
        await ws.send_json({"count": count, "sha256": digest.hexdigest()})
    elif "flood" in query:
        size = int(query["size"])
        for i in range(int(query["flood"])):
            await ws.send(i.to_bytes(4, "big") + bytes(size - 4))
            log_event(f"sent {tag} {i}")
        log_event(f"flood done {tag}")
        await ws.receive()


async def resources(request):
    """``/observe/resources/``: what a leak would grow in this worker process (objects counted
    after a full collection, so that garbage not yet collected is not taken for a leak)."""
    from django.http import JsonResponse

    gc.collect()
    return JsonResponse(
        {
            "pid": os.getpid(),
            "fds": len(os.listdir("/proc/self/fd")),
            "tasks": len(asyncio.all_tasks()),
            "threads": threading.active_count(),
            "objects": len(gc.get_objects()),
        }
    )
