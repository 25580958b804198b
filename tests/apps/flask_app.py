"""A Flask application (a plain WSGI app to the worker): ``/pid`` and an echo of any path."""

from __future__ import annotations

import os

from flask import Flask, Response, request

from tests.apps.common import echo_payload, json_body, log_call

app = Flask(__name__)

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@app.before_request
def _log_call() -> None:
    log_call(request.environ)


@app.route("/pid")
def pid() -> dict[str, int]:
    """The worker's pid."""
    return {"pid": os.getpid()}


@app.route("/", defaults={"path": ""}, methods=ALL_METHODS)
@app.route("/<path:path>", methods=ALL_METHODS)
def echo(path: str) -> Response:
    """The request as the application saw it."""
    headers, body = json_body(echo_payload(request.environ, request.get_data()))
    return Response(body, headers=headers)
