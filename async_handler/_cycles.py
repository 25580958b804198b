"""Freeing a finished request by reference counting instead of the cyclic collector.

Django's contrib middleware leave every request in reference cycles: ``AuthenticationMiddleware``
sets ``request.user`` to a ``SimpleLazyObject`` whose closure holds the request and
``request.auser`` to ``partial(auser, request)``; ``MessageMiddleware`` sets
``request._messages`` to a storage (and, for the fallback storage, a list of storages) each
holding ``.request``.  Such a request, with everything only it reaches (``META``, the session,
the cookies, the resolver match: about 35 GC-tracked objects on startproject's stack), is
freed only when the cyclic collector next runs, and until then the collector walks it at each
young collection; under load that walking and freeing, cold in cache, was a fifth of the
worker's CPU for a sync view (``benchmarks/RESULTS.md``).

:func:`release` removes those back-references once the request is over, but only when reference
counts prove that nothing outside the request's own structure can reach it or them: then
removing them is unobservable, and the request is freed as soon as its last holder lets go.
Anything else (the request kept by a task, a log record, a test; a weak reference to it; a
middleware with cycles of its own) fails the proof and is left, unchanged, to the collector.

Stdlib and Django only; used by :mod:`async_handler.handler`.
"""

from __future__ import annotations

import sys
import weakref
from functools import partial
from types import FunctionType
from typing import Any

from django.utils.functional import SimpleLazyObject

__all__ = ["ENABLED", "release"]

# sys.getrefcount() is exact on CPython with the GIL up to 3.13.  Python 3.14 lets the
# interpreter skip reference-count updates for borrowed references ("What's New in 3.14",
# sys.getrefcount), and a free-threaded build counts references per thread: there a count that
# looks right proves nothing, so the collector keeps the job.
ENABLED = (
    sys.implementation.name == "cpython"
    and sys.version_info < (3, 14)
    and getattr(sys, "_is_gil_enabled", lambda: True)()
)

# getrefcount(x) of an object held only by one container: the container's reference, the
# local name in the frame that asks, and getrefcount's own argument.
_HELD_ONCE = 3


def _lazy_user_refs(value: SimpleLazyObject, request: object) -> int:
    # SimpleLazyObject(lambda: get_user(request)): the lambda, held only by the lazy object,
    # whose closure cell, held only by the lambda, holds the request.
    func = value.__dict__.get("_setupfunc")
    if type(func) is not FunctionType or sys.getrefcount(func) != _HELD_ONCE:
        return -1
    cells = func.__closure__
    if cells is None or len(cells) != 1 or sys.getrefcount(cells) != _HELD_ONCE:
        return -1
    cell = cells[0]
    if sys.getrefcount(cell) != _HELD_ONCE:
        return -1
    return 1 if cell.cell_contents is request else -1


def _storage_refs(storage: Any, request: object) -> int:
    # A messages storage: .request, and the fallback storage's .storages list of storages.
    state = getattr(storage, "__dict__", None)
    if state is None or state.get("request") is not request:
        return -1
    refs = 1
    inner = state.get("storages")
    if inner is not None:
        if type(inner) is not list or sys.getrefcount(inner) != _HELD_ONCE:
            return -1
        for sub in inner:
            sub_state = getattr(sub, "__dict__", None)
            if (
                sub_state is None
                or sub_state.get("request") is not request
                or sub_state.get("storages") is not None
                or sys.getrefcount(sub) != _HELD_ONCE
            ):
                return -1
            refs += 1
    return refs


def release(request: Any, held: int) -> bool:
    """Break the request's known back-references if nothing else can reach it; return whether
    it did.

    ``held`` is the number of references the caller (and its callers) hold to ``request``,
    besides the argument itself.  Safe to call on any object: without the proof it does nothing.
    """
    if not ENABLED or weakref.getweakrefcount(request):
        return False
    state = getattr(request, "__dict__", None)
    if type(state) is not dict:
        return False
    inside = 0
    found: list[str] = []
    for name in ("user", "auser", "_messages"):
        value = state.get(name)
        if value is None:
            continue
        if sys.getrefcount(value) != _HELD_ONCE:
            return False
        kind = type(value)
        if kind is SimpleLazyObject:
            refs = _lazy_user_refs(value, request)
        elif kind is partial:
            args = value.args
            refs = (
                1
                if len(args) == 1 and args[0] is request and sys.getrefcount(args) == _HELD_ONCE
                else -1
            )
        else:
            refs = _storage_refs(value, request)
        if refs < 0:
            return False
        inside += refs
        found.append(name)
    # getrefcount's argument, this frame's `request`, the caller's references, the back-refs.
    if not found or sys.getrefcount(request) != 2 + held + inside:
        return False
    for name in found:
        del state[name]
    return True
