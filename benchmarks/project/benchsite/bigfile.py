"""The 100 MB file the ``FileResponse`` scenario serves, generated on demand (never committed)."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

SIZE = 100 * 1024 * 1024
ENV_VAR = "BENCH_BIG_FILE"

_lock = threading.Lock()
_fallback: Path | None = None


def write_big_file(path: Path, size: int = SIZE) -> None:
    """Write ``size`` bytes of a repeating pattern to ``path``, replacing it atomically."""
    block = bytes(range(256)) * 4096  # 1 MiB
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        remaining = size
        while remaining:
            chunk = block[: min(remaining, len(block))]
            f.write(chunk)
            remaining -= len(chunk)
    os.replace(tmp, path)


def big_file_path() -> Path:
    """Return the file to serve: ``$BENCH_BIG_FILE`` if set, else one made once in a temp dir.

    ``benchmarks/run.py`` creates the file before starting any server and passes its path, so
    servers never pay for writing it during a measurement; the fallback is for running the project
    by hand.
    """
    global _fallback
    configured = os.environ.get(ENV_VAR)
    if configured:
        path = Path(configured)
        if not path.is_file() or path.stat().st_size != SIZE:
            raise FileNotFoundError(f"{ENV_VAR}={configured!r} is not a {SIZE}-byte file")
        return path
    with _lock:
        if _fallback is None:
            directory = Path(tempfile.mkdtemp(prefix="bench-bigfile-"))
            candidate = directory / "big.bin"
            write_big_file(candidate)
            _fallback = candidate
        return _fallback
