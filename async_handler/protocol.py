"""The HTTP layer's public names, re-exported from :mod:`async_handler.http` (where the code
lives, one concern per module): import them from here or from their modules."""

from __future__ import annotations

from .http.config import Environ, Logger, OnRequestEnd, OnRequestStart, ServerConfig
from .http.connection import HttpProtocol
from .http.response import ClientDisconnected, RequestCycle
from .http.sending import STATS, FileWrapper
from .http.server import Server, ServerState, serve

__all__ = [
    "STATS",
    "ClientDisconnected",
    "Environ",
    "FileWrapper",
    "HttpProtocol",
    "Logger",
    "OnRequestEnd",
    "OnRequestStart",
    "RequestCycle",
    "Server",
    "ServerConfig",
    "ServerState",
    "serve",
]
