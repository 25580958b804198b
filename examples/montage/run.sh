#!/usr/bin/env bash
# Run the montage example under gunicorn with async_handler's AsyncioWorker, from a fresh clone:
#
#     ./examples/montage/run.sh                 # http://127.0.0.1:8000/
#     ./examples/montage/run.sh --workers 2     # extra arguments go to gunicorn
#     MONTAGE_REDIS_URL=redis://127.0.0.1:6379/0 ./examples/montage/run.sh --workers 2
#                                               # the chat's groups shared by the workers
#
# It creates .venv at the repository root when missing, installs the repository into it
# (editable, with uvloop) when it does not hold this checkout yet (MONTAGE_REINSTALL=1 forces
# it), applies the migrations and execs gunicorn.  PYTHON picks the interpreter (>= 3.10) for
# the new virtualenv; MONTAGE_BIND, MONTAGE_DB and the other settings are read from the
# environment (see gunicorn.conf.py and montage/settings.py).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/.venv"

if [[ ! -x "$venv/bin/python" ]]; then
    python="${PYTHON:-python3}"
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "run.sh: $python is older than Python 3.10; set PYTHON to a newer interpreter" >&2
        exit 1
    fi
    echo "run.sh: creating $venv" >&2
    "$python" -m venv "$venv"
fi

# MONTAGE_REDIS_URL puts the chat's groups on Redis: that needs the [redis] extra.
extras="uvloop"
if [[ -n "${MONTAGE_REDIS_URL:-}" ]]; then
    extras="uvloop,redis"
fi

# Is this checkout's async_handler, with gunicorn, uvloop (and channels_redis when asked for),
# importable from the venv?
needs_install() {
    [[ "${MONTAGE_REINSTALL:-0}" == 1 ]] && return 0
    if [[ "$extras" == *redis* ]] && ! "$venv/bin/python" -c 'import channels_redis' 2>/dev/null; then
        return 0
    fi
    ! "$venv/bin/python" - "$root" <<'PY' 2>/dev/null
import sys
from pathlib import Path

import async_handler, gunicorn, uvloop  # noqa: F401

sys.exit(Path(async_handler.__file__).resolve().parent != Path(sys.argv[1]) / "async_handler")
PY
}

if needs_install; then
    echo "run.sh: installing $root[$extras] into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e "$root[$extras]"
fi

cd "$here"
"$venv/bin/python" manage.py migrate --noinput
exec "$venv/bin/gunicorn" -c gunicorn.conf.py "$@" montage.wsgi:application
