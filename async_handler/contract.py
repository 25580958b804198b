"""The server contract between a loop-owning WSGI server and an async-aware application.

It extends PEP 3333 with two environ keys; any server may implement it, and any application may
honour it.  This module is stdlib-only so that both sides can import it.

An application declares that it honours the contract with a true class attribute named
:data:`AWAITABLE_ATTR`.  A server that runs an asyncio event loop calls such an application *on
its loop* with ``environ[ASYNC_KEY] = True``; it calls every other application (and any WSGI
middleware wrapping ours, which does not carry the attribute) in a worker thread, without the
key, as a plain PEP 3333 application.  With the key set, ``application(environ,
start_response)`` returns an *awaitable* instead of an iterable.  The server awaits it on its
loop, in the task that serves the request, and:

* ``start_response`` has been called by the time the awaitable completes (exactly as PEP 3333
  requires before the first body chunk);
* the awaitable's result is the response body: a sync iterable of ``bytes`` (the server reads
  any iterable that is not a ``list`` or ``tuple`` off the loop, since it may block) or an async
  iterable of ``bytes`` (iterated on the loop);
* a result that is an instance of the server's ``wsgi.file_wrapper`` may be sent with
  ``sendfile``;
* when the body is finished, or the request is abandoned, the server awaits ``result.aclose()``
  if the result has it, and otherwise calls ``result.close()`` off the loop, as PEP 3333 asks;
* if the client goes away or a server timeout expires while the awaitable is pending, the server
  cancels its task; the application sees :class:`asyncio.CancelledError` and cleans up itself.

The server may also pass its thread pool as ``environ[POOL_KEY]`` (an
:class:`async_handler.threads.ThreadPool`) so that the application runs its sync code on the
same long-lived threads instead of a pool of its own.

An application that does not see ``ASYNC_KEY`` must behave as an ordinary WSGI application.
"""

from __future__ import annotations

__all__ = ["ASYNC_KEY", "AWAITABLE_ATTR", "POOL_KEY"]

#: Set to ``True`` by a server that awaits the application's result on its event loop.
ASYNC_KEY = "async_handler.async"

#: The server's :class:`~async_handler.threads.ThreadPool`, for the application's sync code.
POOL_KEY = "async_handler.thread_pool"

#: Name of the class attribute (``True``) by which an application declares it honours the contract.
AWAITABLE_ATTR = "async_handler_awaitable"
