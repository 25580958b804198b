"""``manage.py runserver`` on an asyncio loop: async views are awaited inline, as in production.

Active when ``"async_handler"`` is in ``INSTALLED_APPS`` above ``django.contrib.staticfiles``
(Django takes a command from the first app that defines it).  It keeps every option of
staticfiles' ``runserver`` (``addrport``, ``--ipv6``, ``--noreload``, ``--nothreading``,
``--nostatic``, ``--insecure``, ``--skip-checks``) and adds:

``--wsgi``
    Run Django's own threaded WSGI server instead, exactly as without this app.
``--threads N``
    Threads for sync code (sync views and middleware, the ORM); default
    ``settings.ASYNC_HANDLER_THREADS`` or 8.  ``--nothreading`` means one thread.
"""

from __future__ import annotations

import errno
import os
import sys
from argparse import ArgumentTypeError
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib.staticfiles.handlers import StaticFilesHandler
from django.contrib.staticfiles.management.commands.runserver import (
    Command as StaticfilesRunserverCommand,
)
from django.core.handlers.wsgi import WSGIHandler
from django.core.management.base import CommandError, CommandParser
from django.core.servers.basehttp import get_internal_wsgi_application
from django.db import connections
from django.utils import autoreload
from django.utils.version import get_docs_version

from ...handler import DEFAULT_THREADS
from ...threads import ThreadPool
from ..devserver import (
    bind_socket,
    is_awaitable_app,
    log_request,
    run_until_exit,
    static_files_handler,
)

_BIND_ERRORS = {
    errno.EACCES: "You don't have permission to access that port.",
    errno.EADDRINUSE: "That port is already in use.",
    errno.EADDRNOTAVAIL: "That IP address can't be assigned to.",
}


def _thread_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


class Command(StaticfilesRunserverCommand):
    """staticfiles' ``runserver``, serving through :mod:`async_handler.protocol` by default."""

    # Set by Django's runserver ``handle()`` from the addrport argument.
    addr: str
    port: str
    use_ipv6: bool
    _raw_ipv6: bool

    help = (
        "Starts a development server on an asyncio event loop: async views are awaited on the "
        "loop, sync code runs on a thread pool. Serves static files like staticfiles' "
        "runserver. Use --wsgi for Django's own threaded server."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Add ``--wsgi`` and ``--threads`` to staticfiles' runserver options."""
        super().add_arguments(parser)
        parser.add_argument(
            "--wsgi",
            action="store_true",
            dest="use_wsgi_server",
            help="Run Django's own threaded WSGI development server instead of the asyncio one.",
        )
        parser.add_argument(
            "--threads",
            type=_thread_count,
            dest="threads",
            default=None,
            help=(
                "Threads for sync views, middleware and ORM calls (default: "
                f"settings.ASYNC_HANDLER_THREADS or {DEFAULT_THREADS}; 1 with --nothreading)."
            ),
        )

    def get_handler(self, *args: Any, **options: Any) -> WSGIHandler:
        """Return the project's WSGI application, wrapped to serve static files when due.

        With the asyncio server the wrapper keeps the application's async contract (see
        :class:`~async_handler.management.devserver.AsyncStaticFilesHandler`); with ``--wsgi``
        it is staticfiles' own ``StaticFilesHandler``.
        """
        handler = get_internal_wsgi_application()
        if options["use_static_handler"] and (settings.DEBUG or options["insecure_serving"]):
            if options.get("use_wsgi_server"):
                return StaticFilesHandler(handler)
            return static_files_handler(handler)
        return handler

    def inner_run(self, *args: Any, **options: Any) -> None:
        """Check the project, bind, print the banner and serve until interrupted.

        Runs in the autoreloader's ``django-main-thread`` (or the main thread with
        ``--noreload``), which owns the event loop for the life of the process.
        """
        if options.get("use_wsgi_server"):
            super().inner_run(*args, **options)
            return
        # An exception silenced in ManagementUtility.execute is raised here, in the child.
        autoreload.raise_last_exception()
        shutdown_message = options.get("shutdown_message", "")

        if not options["skip_checks"]:
            self.stdout.write("Performing system checks...\n\n")
            self.check(display_num_errors=True)
        self.check_migrations()
        for conn in connections.all(initialized_only=True):
            conn.close()

        threads = options["threads"] or getattr(settings, "ASYNC_HANDLER_THREADS", DEFAULT_THREADS)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise CommandError(
                f"settings.ASYNC_HANDLER_THREADS must be a positive integer, got {threads!r}."
            )
        if not options["use_threading"]:
            threads = 1
        try:
            handler = self.get_handler(*args, **options)
            sock = bind_socket(self.addr, int(self.port), self.use_ipv6)
        except OSError as exc:
            self.stderr.write(f"Error: {_BIND_ERRORS.get(exc.errno or 0, exc)}")
            # sys.exit would only end this thread when the autoreloader runs us.
            os._exit(1)
        self.print_banner(sock.getsockname()[1], threads, is_awaitable_app(handler))

        pool = ThreadPool(threads, name="runserver-sync")
        try:
            run_until_exit(handler, sock, pool, log_request)
        except KeyboardInterrupt:
            if shutdown_message:
                self.stdout.write(shutdown_message)
            sys.exit(0)
        finally:
            sock.close()
            pool.shutdown()

    def print_banner(self, port: int, threads: int, awaitable: bool) -> None:
        """Print Django's startup banner, saying how the application is served.

        ``awaitable`` tells whether the WSGI application honours the async_handler contract
        (async views on the loop) or is a plain WSGI callable (every request on a thread).
        """
        quit_command = "CTRL-BREAK" if sys.platform == "win32" else "CONTROL-C"
        if self._raw_ipv6:
            addr = f"[{self.addr}]"
        elif self.addr == "0":
            addr = "0.0.0.0"
        else:
            addr = self.addr
        now = datetime.now().strftime("%B %d, %Y - %X")
        plural = "s" if threads != 1 else ""
        if awaitable:
            mode = (
                f"Serving async views on an asyncio event loop (async_handler), {threads} "
                f"thread{plural} for sync code; --wsgi for Django's threaded server."
            )
        else:
            mode = (
                f"Serving {settings.WSGI_APPLICATION or 'the default WSGI application'} on "
                f"{threads} thread{plural} (async_handler): it is not an "
                "AsyncDjangoApplication, so async views do not share the event loop."
            )
        # "Starting development server at <url>" is Django's wording: IDEs parse that line.
        self.stdout.write(
            f"{now}\n"
            f"Django version {self.get_version()}, using settings {settings.SETTINGS_MODULE!r}\n"
            f"Starting development server at {self.protocol}://{addr}:{port}/\n"
            f"{mode}\n"
            f"Quit the server with {quit_command}."
        )
        if os.environ.get("DJANGO_RUNSERVER_HIDE_WARNING") != "true":
            self.stdout.write(
                self.style.WARNING(
                    "WARNING: this is a development server, not for production use. In "
                    "production, run gunicorn with the async_handler.worker.AsyncioWorker "
                    "worker class.\nDeployment checklist: "
                    f"https://docs.djangoproject.com/en/{get_docs_version()}/howto/deployment/"
                )
            )
