"""Views of the montage example.

Most are ``async def``: under the ``AsyncioWorker`` they are awaited on the worker's event loop, so
a request sleeping in ``asyncio.sleep`` holds no thread.  ``download`` is a plain sync view, to show
that sync views keep working (they run on the worker's thread pool).
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from django.http import (
    FileResponse,
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    HttpResponseBase,
    HttpResponseNotAllowed,
    JsonResponse,
    StreamingHttpResponse,
)
from django.shortcuts import redirect, render

from .forms import NoteForm
from .models import Note

ASSETS = Path(__file__).resolve().parent / "assets"


class BadParameter(ValueError):
    """A query parameter is malformed or out of range; the message is shown to the client."""


def _int_param(request: HttpRequest, name: str, default: int, low: int, high: int) -> int:
    raw = request.GET.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadParameter(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise BadParameter(f"{name} must be between {low} and {high}, got {value}")
    return value


def _float_param(request: HttpRequest, name: str, default: float, low: float, high: float) -> float:
    raw = request.GET.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadParameter(f"{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:  # also rejects nan
        raise BadParameter(f"{name} must be between {low} and {high}, got {raw}")
    return value


async def index(request: HttpRequest) -> HttpResponse:
    return render(request, "gallery/index.html", {"note_count": await Note.objects.acount()})


async def hello_world(request: HttpRequest) -> HttpResponse:
    """The 2016 recipe's view: one second of waiting that holds no thread."""
    await asyncio.sleep(1)
    return HttpResponse("Hello, world", content_type="text/plain; charset=utf-8")


async def fan_out(request: HttpRequest) -> HttpResponse:
    """Run ``n`` simulated back-end calls at once; task ``i`` takes ``(i + 1) * step`` seconds.

    The response shows that the wall time is the longest call, not the sum of them.
    """
    try:
        n = _int_param(request, "n", 5, 1, 50)
        step = _float_param(request, "step", 0.1, 0.0, 1.0)
    except BadParameter as exc:
        return HttpResponseBadRequest(str(exc), content_type="text/plain; charset=utf-8")
    started = time.perf_counter()

    async def backend_call(i: int) -> dict[str, float | int]:
        delay = (i + 1) * step
        await asyncio.sleep(delay)
        return {
            "task": i,
            "slept": round(delay, 3),
            "done_after": round(time.perf_counter() - started, 4),
        }

    results = await asyncio.gather(*(backend_call(i) for i in range(n)))
    elapsed = time.perf_counter() - started
    return JsonResponse(
        {
            "tasks": results,
            "elapsed": round(elapsed, 4),
            "longest_call": round(n * step, 3),
            "sequential_would_take": round(sum(r["slept"] for r in results), 3),
        }
    )


async def _ticks(first: int, count: int, interval: float) -> AsyncIterator[str]:
    # The SSE wire format: https://html.spec.whatwg.org/multipage/server-sent-events.html
    for n in range(first, count + 1):
        if n != first:
            await asyncio.sleep(interval)
        payload = json.dumps({"n": n, "of": count, "time": time.time()})
        yield f"id: {n}\nevent: tick\ndata: {payload}\n\n"
    yield f"event: done\ndata: {json.dumps({'of': count})}\n\n"


async def event_stream(request: HttpRequest) -> HttpResponseBase:
    """``count`` server-sent ``tick`` events, ``interval`` seconds apart, then a ``done`` event.

    A reconnecting ``EventSource`` sends ``Last-Event-ID``; the stream resumes after it.
    """
    try:
        count = _int_param(request, "count", 10, 1, 1000)
        interval = _float_param(request, "interval", 0.5, 0.0, 10.0)
        last_id = request.headers.get("Last-Event-ID", "0") or "0"
        if not last_id.isdigit():
            raise BadParameter(f"Last-Event-ID must be a tick number, got {last_id!r}")
    except BadParameter as exc:
        return HttpResponseBadRequest(str(exc), content_type="text/plain; charset=utf-8")
    response = StreamingHttpResponse(
        _ticks(int(last_id) + 1, count, interval), content_type="text/event-stream"
    )
    response["Cache-Control"] = "no-cache"
    # nginx buffers proxied responses unless told not to; an event must reach the browser now.
    response["X-Accel-Buffering"] = "no"
    return response


async def events_page(request: HttpRequest) -> HttpResponse:
    return render(request, "gallery/events.html")


def download(request: HttpRequest) -> FileResponse:
    """A file sent through ``FileResponse`` (the server may use ``sendfile`` for it)."""
    return FileResponse(
        open(ASSETS / "montage.txt", "rb"),  # FileResponse closes it
        as_attachment=True,
        filename="montage.txt",
    )


async def notes(request: HttpRequest) -> HttpResponse:
    """List recent notes; ``POST`` creates one (CSRF-protected) with the async ORM."""
    if request.method not in ("GET", "HEAD", "POST"):
        return HttpResponseNotAllowed(["GET", "HEAD", "POST"])
    if request.method == "POST":
        form = NoteForm(request.POST)
        if form.is_valid():
            note = await Note.objects.acreate(**form.cleaned_data)
            return redirect("note-detail", pk=note.pk)
    else:
        form = NoteForm()
    recent = [note async for note in Note.objects.all()[:20]]
    return render(request, "gallery/notes.html", {"form": form, "notes": recent})


async def note_detail(request: HttpRequest, pk: int) -> HttpResponse:
    try:
        note = await Note.objects.aget(pk=pk)
    except Note.DoesNotExist:
        raise Http404(f"No note with id {pk}") from None
    return render(request, "gallery/note_detail.html", {"note": note})


async def request_info(request: HttpRequest) -> JsonResponse:
    """What Django made of the request: handy behind a proxy (scheme, host, client address)."""
    return JsonResponse(
        {
            "scheme": request.scheme,
            "is_secure": request.is_secure(),
            "host": request.get_host(),
            "remote_addr": request.META.get("REMOTE_ADDR"),
            "path": request.path,
            "x_forwarded_for": request.headers.get("X-Forwarded-For"),
            "x_forwarded_proto": request.headers.get("X-Forwarded-Proto"),
        }
    )
