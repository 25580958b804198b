"""HTTP/1.1 for WSGI applications on an asyncio loop, one concern per module.

========================  ==================================================================
:mod:`.config`            ``ServerConfig``: every limit and timeout, with its reason
:mod:`.fields`            field and status syntax, ``Date``, refusal answers, body spooling
:mod:`.request`           the request head: parser callbacks, 414/431 limits, request-line,
                          target, ``Host`` and trailer checks, the environ
:mod:`.response`          ``RequestCycle``: ``start_response``, ``write()``, the head,
                          ``Content-Length`` or chunked framing, ``HEAD``
:mod:`.dispatch`          running the application (loop or pool thread), 500/503
:mod:`.sending`           bodies: iterables, async iterables, the file wrapper, ``sendfile``
:mod:`.flow`              back-pressure in both directions
:mod:`.connection`        ``HttpProtocol``: keep-alive, pipelining, timers, shutdown, abort
:mod:`.server`            ``ServerState``, ``Server``, ``serve``
========================  ==================================================================

The package imports only the standard library, ``httptools``, :mod:`async_handler.threads` and
:mod:`async_handler.contract`, so it serves any WSGI application; :mod:`async_handler.worker`
adapts it to gunicorn.  :mod:`async_handler.protocol` re-exports its public names.
"""
