"""gunicorn settings for the montage example: ``gunicorn -c gunicorn.conf.py montage.wsgi``.

Only ``worker_class`` is specific to async_handler; the rest is ordinary gunicorn.
"""

import os

# Async views run on this worker's event loop; sync views and sync middleware on ``threads``.
worker_class = "async_handler.worker.AsyncioWorker"
threads = 8
workers = int(os.environ.get("MONTAGE_WORKERS", "1"))
bind = os.environ.get("MONTAGE_BIND", "127.0.0.1:8000")

# Access log on stdout, so that run.sh shows one line per request.
accesslog = "-"

# Knobs gunicorn has no setting for are read from the environment by the worker
# (see async_handler.worker); raw_env sets them for the workers only:
# raw_env = [
#     "ASYNC_HANDLER_LOOP=asyncio",            # auto (uvloop when installed), asyncio, uvloop
#     "ASYNC_HANDLER_MAX_BODY_SIZE=10485760",  # largest request body, bytes (0: no limit)
#     "ASYNC_HANDLER_SPOOL_SIZE=1048576",      # bodies above this go to a temporary file
#     "ASYNC_HANDLER_HEADER_TIMEOUT=10",       # seconds to receive a request head
#     "ASYNC_HANDLER_REQUEST_TIMEOUT=30",      # seconds before an async view must respond
# ]
