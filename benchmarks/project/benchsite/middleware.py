"""A function-style middleware, the first example of Django's middleware docs: sync-only.

It stands for the many third-party and in-house middleware written that way; with WhiteNoise's
``WhiteNoiseMiddleware`` it makes the ``real`` stack (see ``settings``).
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponseBase


def timing_header(
    get_response: Callable[[HttpRequest], HttpResponseBase],
) -> Callable[[HttpRequest], HttpResponseBase]:
    def middleware(request: HttpRequest) -> HttpResponseBase:
        response = get_response(request)
        response["X-Served-By"] = "benchsite"
        return response

    return middleware
