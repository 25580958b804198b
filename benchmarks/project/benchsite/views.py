"""The views the benchmark scenarios hit.

Each is the plainest way to write its case in Django; none is tuned for any server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from django.http import FileResponse, HttpRequest, HttpResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from .bigfile import big_file_path

HELLO = b"Hello, world!"
SSE_EVENTS = 20


async def hello_async(request: HttpRequest) -> HttpResponse:
    return HttpResponse(HELLO, content_type="text/plain")


def hello_sync(request: HttpRequest) -> HttpResponse:
    return HttpResponse(HELLO, content_type="text/plain")


async def sleep_async(request: HttpRequest) -> HttpResponse:
    # Stands for an awaited upstream call (database, HTTP API) that takes 100 ms.
    await asyncio.sleep(0.1)
    return HttpResponse(HELLO, content_type="text/plain")


async def _events() -> AsyncIterator[bytes]:
    for i in range(SSE_EVENTS):
        yield f'id: {i}\nevent: tick\ndata: {{"n": {i}}}\n\n'.encode()


async def sse_async(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(
        _events(), content_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def big_file(request: HttpRequest) -> FileResponse:
    return FileResponse(open(big_file_path(), "rb"), content_type="application/octet-stream")


@csrf_exempt
async def upload_async(request: HttpRequest) -> HttpResponse:
    return HttpResponse(str(len(request.body)).encode(), content_type="text/plain")
