#!/usr/bin/env python3
"""Run the benchmark project under each server and compare them (see ``benchmarks/README.md``).

Every measurement starts a fresh server with one worker pinned to one core (``taskset``), warms it
up, and drives it with ``wrk`` pinned to another core.  Rounds are interleaved (every server runs
scenario 1, then every server runs scenario 2, ...; the server order flips each round) so that
drift in the machine's speed spreads over all servers, and each figure is the median over rounds.

Writes ``benchmarks/out/results.json`` (every raw run plus the medians) and a bar chart.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECT = HERE / "project"
OUT = HERE / "out"
REPORT_LUA = HERE / "wrk" / "report.lua"
DOWNLOAD_CLIENT = HERE / "download.py"

sys.path.insert(0, str(PROJECT))
from benchsite.bigfile import ENV_VAR as BIG_FILE_ENV  # noqa: E402
from benchsite.bigfile import SIZE as BIG_FILE_SIZE  # noqa: E402
from benchsite.bigfile import write_big_file  # noqa: E402

UPLOAD_BYTES = 1024 * 1024
# Servers close idle keep-alive connections after this; long enough for the idle-RSS step.
KEEPALIVE_S = 60
STARTUP_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0
WARMUP_CONNECTIONS = 8
IDLE_CONNECTIONS = 1000
OURS = "ours"
# --baseline DIR: ours again, importing async_handler from another checkout (before/after a change).
BASELINE = "ours-baseline"
# Granian's servers: a Python main process that supervises one worker process (Rust server,
# Python app), so the worker is the child to account for, as with gunicorn.
GRANIAN = {"granian-wsgi": "wsgi", "granian-asgi": "asgi"}


@dataclass(frozen=True)
class Server:
    """One server under test: how to start it with one worker for a given application kind."""

    name: str
    label: str
    # Module:attribute to serve, per application kind ("django" or "bare"); absent = unsupported.
    apps: dict[str, str]
    keeps_alive: bool = True
    # prepended to PYTHONPATH, so that this server imports async_handler from another checkout
    pythonpath: str = ""

    def argv(self, app: str, port: int) -> list[str]:
        target = self.apps[app]
        py = sys.executable
        if self.name == "uvicorn":
            return [
                py, "-m", "uvicorn", target,
                "--host", "127.0.0.1", "--port", str(port), "--app-dir", str(PROJECT),
                "--loop", "uvloop", "--http", "httptools", "--lifespan", "off",
                "--no-access-log", "--log-level", "warning", "--backlog", "2048",
                "--timeout-keep-alive", str(KEEPALIVE_S), "--timeout-graceful-shutdown", "2",
            ]  # fmt: skip
        if self.name in GRANIAN:
            # Default blocking and runtime threads: the configuration a user gets by default.
            # --http 1: every client here speaks HTTP/1.1; no upgrade sniffing.
            return [
                py, "-m", "granian", "--interface", GRANIAN[self.name],
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--working-dir", str(PROJECT), "--http", "1", "--no-ws",
                "--log-level", "warning", "--no-access-log", "--backlog", "2048",
                "--workers-kill-timeout", "2", target,
            ]  # fmt: skip
        common = [
            py, "-m", "gunicorn", "--workers", "1", "--bind", f"127.0.0.1:{port}",
            "--chdir", str(PROJECT), "--log-level", "warning", "--backlog", "2048",
            "--keep-alive", str(KEEPALIVE_S), "--worker-connections", "2000",
            "--timeout", "120", "--graceful-timeout", "2",
        ]  # fmt: skip
        worker = {
            OURS: ["--worker-class", "async_handler.worker.AsyncioWorker", "--threads", "8"],
            "gunicorn-asgi": ["--worker-class", "asgi", "--asgi-lifespan", "off"],
            "gthread": ["--worker-class", "gthread", "--threads", "8"],
            "sync": ["--worker-class", "sync"],
        }[OURS if self.name == BASELINE else self.name]
        return [*common, *worker, target]


SERVERS: dict[str, Server] = {
    s.name: s
    for s in [
        Server(
            OURS,
            "ours: AsyncioWorker + AsyncDjangoApplication",
            {"django": "wsgi_async:application", "bare": "bare_contract:application"},
        ),
        Server(
            "gunicorn-asgi",
            "gunicorn -k asgi + ASGIHandler",
            {"django": "asgi:application", "bare": "bare_asgi:application"},
        ),
        Server(
            "uvicorn",
            "uvicorn (uvloop, httptools) + ASGIHandler",
            {"django": "asgi:application", "bare": "bare_asgi:application"},
        ),
        Server(
            "gthread", "gunicorn gthread x8 + WSGIHandler", {"django": "wsgi_django:application"}
        ),
        Server("granian-wsgi", "granian WSGI + WSGIHandler", {"django": "wsgi_django:application"}),
        Server(
            "granian-asgi",
            "granian ASGI + ASGIHandler",
            {"django": "asgi:application", "bare": "bare_asgi:application"},
        ),
        # gunicorn's sync worker closes the connection after every response.
        Server("sync", "gunicorn sync + WSGIHandler", {"django": "wsgi_django:application"}, False),
    ]
}


@dataclass(frozen=True)
class Scenario:
    """One load pattern: a path, a connection count, and what the figure of merit is."""

    name: str
    label: str
    path: str
    connections: int
    app: str = "django"
    middleware: str = "stock"
    timeout_s: int = 5
    upload_bytes: int = 0
    # "rps": requests per second; "gbps": response bytes per second, in GB/s.
    metric: str = "rps"
    # "wrk", or "download": benchmarks/download.py, which discards bodies in the kernel
    # (MSG_TRUNC) on parallel connections, so large bodies measure the server, not the client.
    client: str = "wrk"


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("hello", "async hello", "/hello/", 100),
        Scenario("hello-sync", "sync hello", "/hello-sync/", 100),
        Scenario("sleep", "async sleep 100 ms, 1,000 conns", "/sleep/", 1000, timeout_s=10),
        Scenario("sse", "async SSE stream, 20 events", "/sse/", 100),
        Scenario(
            "file",
            "100 MB FileResponse",
            "/file/",
            4,
            timeout_s=60,
            metric="gbps",
            client="download",
        ),
        Scenario("upload", "1 MB upload (POST)", "/upload/", 32, upload_bytes=UPLOAD_BYTES),
        Scenario("hello-nomw", "async hello, no middleware", "/hello/", 100, middleware="none"),
        # A typical project's stack: stock + WhiteNoise + a function-style middleware (sync-only).
        Scenario("hello-real", "async hello, real stack", "/hello/", 100, middleware="real"),
        Scenario(
            "hello-sync-real", "sync hello, real stack", "/hello-sync/", 100, middleware="real"
        ),
        Scenario(
            "sleep-real",
            "async sleep 100 ms, 1,000 conns, real stack",
            "/sleep/",
            1000,
            middleware="real",
            timeout_s=10,
        ),
        Scenario("bare", "worker alone: trivial app, no Django", "/", 100, app="bare"),
    ]
}
RSS_STEP = "rss"


@dataclass
class Settings:
    duration: int
    rounds: int
    warmup: int
    server_core: int
    client_core: int
    big_file: Path
    logs: Path


@dataclass
class Running:
    server: Server
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    worker_pid: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_ticks(core: int) -> tuple[int, int]:
    """(user, steal) clock ticks of one core since boot, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            fields = [int(x) for x in line.split()[1:9]]
            return fields[0] + fields[1], fields[7]
    raise RuntimeError(f"no cpu{core} line in /proc/stat")


def process_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of a process, in clock ticks."""
    # The command name (field 2) may contain spaces; the fields after it are fixed.
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]), int(fields[12])


def own_ticks(pids: list[int]) -> tuple[int, int]:
    ticks = [process_ticks(p) for p in pids]
    return sum(t[0] for t in ticks), sum(t[1] for t in ticks)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def start_server(server: Server, scenario: Scenario, settings: Settings, tag: str) -> Running:
    port = free_port()
    env = dict(os.environ)
    env["BENCH_MIDDLEWARE"] = scenario.middleware
    env[BIG_FILE_ENV] = str(settings.big_file)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(PROJECT), server.pythonpath, env.get("PYTHONPATH")])
    )
    env.pop("DJANGO_SETTINGS_MODULE", None)
    log = settings.logs / f"{tag}.log"
    argv = ["taskset", "--cpu-list", str(settings.server_core), *server.argv(scenario.app, port)]
    with open(log, "wb") as log_file:
        log_file.write((" ".join(argv) + "\n").encode())
        log_file.flush()
        process = subprocess.Popen(
            argv,
            cwd=PROJECT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = Running(server, process, port, log)
    probe = scenario.path if scenario.upload_bytes == 0 and scenario.metric == "rps" else "/hello/"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_error = ""
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with {process.returncode} while starting:\n{log_tail(log)}"
            )
        try:
            status, _ = get(port, probe, timeout=2.0)
        except OSError as exc:
            last_error = repr(exc)
        else:
            if status == 200:
                break
            stop_server(running)
            raise RuntimeError(
                f"{server.name}: GET {probe} answered {status} at startup:\n{log_tail(log)}"
            )
        if time.monotonic() > deadline:
            stop_server(running)
            raise RuntimeError(
                f"{server.name} not ready after {STARTUP_TIMEOUT_S:.0f}s ({last_error}):\n"
                f"{log_tail(log)}"
            )
        time.sleep(0.05)
    if server.name == "uvicorn":
        running.worker_pid = process.pid
    else:
        workers = granian_worker(process.pid) if server.name in GRANIAN else children(process.pid)
        if len(workers) != 1:
            stop_server(running)
            raise RuntimeError(f"{server.name}: expected 1 worker process, found {workers}")
        running.worker_pid = workers[0]
    return running


def granian_worker(pid: int) -> list[int]:
    """Granian's worker processes among the main process's children.

    The main process may also run multiprocessing's resource tracker; it serves nothing.
    """
    workers = []
    for child in children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"resource_tracker" not in cmdline:
            workers.append(child)
    return workers


def stop_server(running: Running) -> None:
    """Stop the server's whole process group: gracefully, then by force after a grace period."""
    process = running.process
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    # The group may outlive its leader (a gunicorn worker still finishing requests).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(STOP_GRACE_S)


@contextlib.contextmanager
def serving(server: Server, scenario: Scenario, settings: Settings, tag: str) -> Iterator[Running]:
    running = start_server(server, scenario, settings, tag)
    try:
        yield running
    finally:
        stop_server(running)


def load_result(raw: dict[str, Any], text: str) -> dict[str, Any]:
    """The result of one load run, from report.lua's (or download.py's) JSON fields."""
    seconds = raw["duration_us"] / 1e6
    socket_errors = sum(raw[k] for k in ("connect_errors", "read_errors", "write_errors"))
    return {
        **raw,
        "rps": raw["requests"] / seconds,
        "gbps": raw["bytes"] / seconds / 1e9,
        "socket_errors": socket_errors + raw["timeouts"],
        "errors": socket_errors + raw["timeouts"] + raw["status_errors"],
        "wrk_text": text,
    }


def run_load(
    port: int,
    scenario: Scenario,
    duration: int,
    connections: int,
    settings: Settings,
) -> dict[str, Any]:
    """Drive the server with the scenario's client; the result has the same shape for both."""
    if scenario.client == "download":
        return run_download(port, scenario, duration, connections, settings)
    return run_wrk(port, scenario, duration, connections, settings)


def run_download(
    port: int,
    scenario: Scenario,
    duration: int,
    connections: int,
    settings: Settings,
) -> dict[str, Any]:
    # A separate process, which pins itself to the client core: run.py stays unpinned, and the
    # client's threads do not share a GIL with run.py's.
    argv = [
        sys.executable, str(DOWNLOAD_CLIENT), "--port", str(port), "--path", scenario.path,
        "--connections", str(connections), "--duration", str(duration),
        "--timeout", str(scenario.timeout_s), "--core", str(settings.client_core),
    ]  # fmt: skip
    return run_client("download.py", argv, "DOWNLOAD_JSON ", duration + scenario.timeout_s + 60)


def run_wrk(
    port: int,
    scenario: Scenario,
    duration: int,
    connections: int,
    settings: Settings,
) -> dict[str, Any]:
    argv = [
        "taskset", "--cpu-list", str(settings.client_core),
        "wrk", "--threads", "1", "--connections", str(connections),
        "--duration", f"{duration}s", "--timeout", f"{scenario.timeout_s}s", "--latency",
        "--script", str(REPORT_LUA), f"http://127.0.0.1:{port}{scenario.path}",
    ]  # fmt: skip
    env = dict(os.environ, WRK_UPLOAD_BYTES=str(scenario.upload_bytes))
    return run_client("wrk", argv, "WRK_JSON ", duration + scenario.timeout_s + 60, env)


def run_client(
    name: str, argv: list[str], prefix: str, timeout: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run a load client and read its one ``prefix`` JSON line into a result."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    line = next((x for x in done.stdout.splitlines() if x.startswith(prefix)), None)
    if line is None:
        raise RuntimeError(f"{name} printed no {prefix}line:\n{done.stdout}\n{done.stderr}")
    return load_result(json.loads(line.removeprefix(prefix)), done.stdout)


def measure(
    server: Server, scenario: Scenario, settings: Settings, round_no: int
) -> dict[str, Any]:
    tag = f"r{round_no}-{scenario.name}-{server.name}"
    with serving(server, scenario, settings, tag) as running:
        if settings.warmup:
            # Few connections, so a slow server is not left with a backlog that bleeds into the
            # measured run.
            run_load(
                running.port,
                scenario,
                settings.warmup,
                min(WARMUP_CONNECTIONS, scenario.connections),
                settings,
            )
        pids = [running.process.pid, *children(running.process.pid)]
        user0, steal0 = cpu_ticks(settings.server_core)
        own_user0, own_sys0 = own_ticks(pids)
        t0 = time.monotonic()
        result = run_load(running.port, scenario, settings.duration, scenario.connections, settings)
        elapsed = time.monotonic() - t0
        user1, steal1 = cpu_ticks(settings.server_core)
        own_user1, own_sys1 = own_ticks(pids)
        result["worker_rss_kib_after"] = rss_kib(running.worker_pid)
        alive = running.process.poll() is None
    hz = os.sysconf("SC_CLK_TCK")
    own_user, own_sys = own_user1 - own_user0, own_sys1 - own_sys0
    result["server_cpu_share"] = (own_user + own_sys) / hz / elapsed
    # User time on the server's core that the server did not use: other jobs on the machine.
    # (Kernel time is left out: loopback TCP work runs in softirq, charged to no process.)  It and
    # the time the hypervisor stole from the core both mean the figure is understated.
    result["core_other_share"] = max(0, (user1 - user0) - own_user) / hz / elapsed
    result["core_steal_share"] = (steal1 - steal0) / hz / elapsed
    result.update(
        server=server.name, scenario=scenario.name, round=round_no, server_alive_at_end=alive
    )
    return result


def measure_undisturbed(
    server: Server,
    scenario: Scenario,
    settings: Settings,
    round_no: int,
    retries: int,
    max_other: float,
) -> dict[str, Any]:
    """``measure``, repeated up to ``retries`` times while other jobs took the server's core."""
    attempt = 0
    while True:
        result = measure(server, scenario, settings, round_no)
        result["attempts"] = attempt + 1
        disturbed = result["core_other_share"] > max_other
        result["disturbed"] = disturbed
        if not disturbed or attempt >= retries:
            return result
        attempt += 1
        print(
            f"  {scenario.name} {server.name}: other processes used "
            f"{result['core_other_share']:.0%} of core {settings.server_core}; measuring again",
            flush=True,
        )


def read_response(sock: socket.socket) -> bytes:
    """Read one HTTP/1.1 response with a Content-Length body; return its status line."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection before the response ended")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection inside the body")
        body += chunk
    return head.split(b"\r\n", 1)[0]


def idle_rss(server: Server, settings: Settings) -> dict[str, Any]:
    """Worker RSS when idle, then holding ``IDLE_CONNECTIONS`` idle keep-alive connections."""
    scenario = SCENARIOS["hello"]
    with serving(server, scenario, settings, f"rss-{server.name}") as running:
        run_wrk(running.port, scenario, max(1, settings.warmup), WARMUP_CONNECTIONS, settings)
        time.sleep(1.0)
        idle = rss_kib(running.worker_pid)
        request = b"GET /hello/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        sockets: list[socket.socket] = []
        try:
            for _ in range(IDLE_CONNECTIONS):
                sock = socket.create_connection(("127.0.0.1", running.port), timeout=10)
                sockets.append(sock)
                sock.sendall(request)
                status = read_response(sock)
                if b" 200 " not in status:
                    raise RuntimeError(f"{server.name}: idle-connection request got {status!r}")
            time.sleep(2.0)
            held = rss_kib(running.worker_pid)
            still_open = 0
            for sock in sockets:
                sock.setblocking(False)
                try:
                    peeked = sock.recv(1, socket.MSG_PEEK)
                except BlockingIOError:
                    still_open += 1
                else:
                    if peeked:
                        still_open += 1
        finally:
            for sock in sockets:
                sock.close()
    return {
        "server": server.name,
        "idle_kib": idle,
        "with_connections_kib": held,
        "connections": IDLE_CONNECTIONS,
        "still_open": still_open,
        "per_connection_bytes": (held - idle) * 1024 / IDLE_CONNECTIONS,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for scenario in SCENARIOS:
        for server in SERVERS:
            mine = [r for r in runs if r["scenario"] == scenario and r["server"] == server]
            if not mine:
                continue
            summary.setdefault(scenario, {})[server] = {
                "rounds": len(mine),
                "rps": statistics.median(r["rps"] for r in mine),
                "gbps": statistics.median(r["gbps"] for r in mine),
                "p50_ms": statistics.median(r["p50_us"] for r in mine) / 1000,
                "p99_ms": statistics.median(r["p99_us"] for r in mine) / 1000,
                "requests": sum(r["requests"] for r in mine),
                "status_errors": sum(r["status_errors"] for r in mine),
                "socket_errors": sum(r["socket_errors"] for r in mine),
                "errors": sum(r["errors"] for r in mine),
                "server_cpu_share": statistics.median(r["server_cpu_share"] for r in mine),
                "max_core_other_share": max(r["core_other_share"] for r in mine),
                "max_core_steal_share": max(r["core_steal_share"] for r in mine),
                "disturbed_rounds": sum(1 for r in mine if r["disturbed"]),
            }
    return summary


def ratios(summary: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    """Ours divided by each rival, on the scenario's figure of merit (higher is better)."""
    out: dict[str, dict[str, float | None]] = {}
    for scenario, by_server in summary.items():
        if OURS not in by_server:
            continue
        metric = SCENARIOS[scenario].metric
        ours = by_server[OURS][metric]
        out[scenario] = {
            rival: (ours / stats[metric] if stats[metric] else None)
            for rival, stats in by_server.items()
            if rival != OURS
        }
    return out


def print_table(
    summary: dict[str, dict[str, dict[str, Any]]], rat: dict[str, dict[str, float | None]]
) -> None:
    header = f"{'scenario':<12} {'server':<14} {'req/s':>10} {'GB/s':>7} {'p50 ms':>9} "
    header += f"{'p99 ms':>9} {'errors':>8} {'ours x':>8}"
    print()
    print(header)
    print("-" * len(header))
    for scenario, by_server in summary.items():
        metric = SCENARIOS[scenario].metric
        for server, s in by_server.items():
            ratio_text = ""
            if server != OURS and scenario in rat:
                ratio = rat[scenario].get(server)
                ratio_text = "inf" if ratio is None else f"{ratio:.2f}"
            gbps = f"{s['gbps']:.2f}" if metric == "gbps" else ""
            print(
                f"{scenario:<12} {server:<14} {s['rps']:>10.0f} {gbps:>7} {s['p50_ms']:>9.2f} "
                f"{s['p99_ms']:>9.2f} {s['errors']:>8d} {ratio_text:>8}"
            )
        print()
    print(
        "'ours x' = our figure / that server's (req/s; GB/s for 'file'); > 1 means ours is faster."
    )
    print("errors = socket errors + timeouts + HTTP status >= 400, summed over rounds.")
    disturbed = [
        f"{scenario}/{server}"
        for scenario, by_server in summary.items()
        for server, s in by_server.items()
        if s["disturbed_rounds"]
    ]
    if disturbed:
        print(
            "Other processes took over the --max-other share of the server core in some rounds "
            f"of: {', '.join(disturbed)} (see results.json: core_other_share)."
        )


def print_rss(rss: list[dict[str, Any]]) -> None:
    if not rss:
        return
    print(f"\nWorker RSS, idle vs {IDLE_CONNECTIONS} idle keep-alive connections:")
    for r in rss:
        print(
            f"  {r['server']:<14} idle {r['idle_kib'] / 1024:7.1f} MiB   with conns "
            f"{r['with_connections_kib'] / 1024:7.1f} MiB   "
            f"{r['per_connection_bytes'] / 1024:6.1f} KiB/conn   ({r['still_open']} still open)"
        )


def plot(
    summary: dict[str, dict[str, dict[str, Any]]],
    rss: list[dict[str, Any]],
    machine: dict[str, Any],
    settings: Settings,
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[tuple[str, float]], str, str]] = []
    for scenario, by_server in summary.items():
        sc = SCENARIOS[scenario]
        unit = "GB/s" if sc.metric == "gbps" else "requests/s"
        bars = [(server, stats[sc.metric]) for server, stats in by_server.items()]
        panels.append((sc.label, bars, unit, "{:.2f}" if sc.metric == "gbps" else "{:,.0f}"))
    if rss:
        bars = [(r["server"], r["per_connection_bytes"] / 1024) for r in rss]
        panels.append(
            (
                f"RSS per idle keep-alive conn ({IDLE_CONNECTIONS})",
                bars,
                "KiB (lower is better)",
                "{:.1f}",
            )
        )
    if not panels:
        return
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 2.9 * rows), squeeze=False)
    palette = {
        OURS: "#d62728",
        "gunicorn-asgi": "#1f77b4",
        "uvicorn": "#2ca02c",
        "gthread": "#9467bd",
        "sync": "#8c564b",
        "granian-wsgi": "#ff7f0e",
        "granian-asgi": "#17becf",
    }
    for ax, (title, bars, unit, fmt) in zip(axes.flat, panels, strict=False):
        names = [b[0] for b in bars][::-1]
        values = [b[1] for b in bars][::-1]
        ax.barh(names, values, color=[palette.get(n, "#7f7f7f") for n in names])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(unit, fontsize=8)
        ax.tick_params(labelsize=8)
        top = max(values) if values and max(values) > 0 else 1.0
        ax.set_xlim(0, top * 1.25)
        for y, v in enumerate(values):
            ax.text(v + top * 0.01, y, fmt.format(v), va="center", fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        f"One worker pinned to 1 core, wrk on another; median of {settings.rounds} x "
        f"{settings.duration}s  ({machine.get('cpu_model', '?')}, Python {machine['python']})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write a run's report (``--json``), making its folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    versions: dict[str, str | None] = {}
    for dist in ("django", "asgiref", "gunicorn", "uvicorn", "uvloop", "httptools", "granian",
                 "django-async-handler"):  # fmt: skip
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    info["versions"] = versions
    # Which snapshot of our code was measured (the repository may have uncommitted changes).
    digest = hashlib.sha256()
    for source in sorted((HERE.parent / "async_handler").rglob("*.py")):
        digest.update(source.read_bytes())
    info["async_handler_sources_sha256"] = digest.hexdigest()[:16]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
        info["wrk"] = (wrk.stdout + wrk.stderr).splitlines()[0].strip()
    return info


def parse_names(text: str | None, known: Sequence[str], what: str) -> list[str]:
    if text is None:
        return list(known)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"unknown {what}: {unknown or text!r}; choose from {', '.join(known)}")
    return names


def preflight(settings: Settings, servers: Sequence[Server]) -> None:
    modules = {"gunicorn", "matplotlib", "async_handler", "django"}
    if any(s.name == "uvicorn" for s in servers):
        modules |= {"uvicorn", "uvloop", "httptools"}
    if any(s.name in GRANIAN for s in servers):
        modules.add("granian")
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    if missing:
        raise SystemExit(
            f"missing Python packages for {sys.executable}: {', '.join(missing)} "
            "(pip install -e '.[test]' uvicorn)"
        )
    for program in ("wrk", "taskset"):
        if shutil.which(program) is None:
            raise SystemExit(
                f"{program} not found on PATH (Debian: apt-get install {program}"
                f"{'' if program == 'wrk' else ' (util-linux)'})"
            )
    cores = os.sched_getaffinity(0)
    for core in (settings.server_core, settings.client_core):
        if core not in cores:
            raise SystemExit(f"core {core} is not available to this process (have {sorted(cores)})")
    if settings.server_core == settings.client_core:
        raise SystemExit("--server-core and --client-core must differ")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * IDLE_CONNECTIONS + 1024
    if soft < wanted:
        # 1,000 connections on each side of loopback need file descriptors in wrk and the worker.
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            print(f"warning: open-file limit is {new}; 1,000-connection runs may fail")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, help="seconds per measured run (default 10)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds; medians (default 3)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up per run (default 2)")
    parser.add_argument("--servers", help=f"comma-separated subset of: {', '.join(SERVERS)}")
    parser.add_argument(
        "--scenarios",
        help=f"comma-separated subset of: {', '.join([*SCENARIOS, RSS_STEP])}",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 s runs, 1 round, 1 s warm-up"
    )
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument(
        "--max-other",
        type=float,
        default=0.10,
        help="re-measure a run when other processes used more than this share of the server's "
        "core (default 0.10)",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="re-measurements of a disturbed run (default 2)"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout of this project: adds the server 'ours-baseline', ours with that "
        "checkout's async_handler, so 'ours x' against it is after / before",
    )
    parser.add_argument("--json", type=Path, default=OUT / "results.json")
    parser.add_argument(
        "--chart",
        type=Path,
        help="PNG path (default benchmarks/results.png; benchmarks/out/results.png with --quick "
        "or --baseline, so a smoke run never replaces the published chart)",
    )
    args = parser.parse_args(argv)

    duration = args.duration or (2 if args.quick else 10)
    rounds = args.rounds or (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if duration < 1 or rounds < 1 or warmup < 0 or args.retries < 0:
        raise SystemExit("--duration and --rounds must be >= 1, --warmup and --retries >= 0")
    # Only a full run of this checkout replaces the published chart.
    published = not args.quick and args.baseline is None
    chart = args.chart or (HERE / "results.png" if published else OUT / "results.png")
    servers = [SERVERS[n] for n in parse_names(args.servers, list(SERVERS), "server")]
    if args.baseline is not None:
        baseline = args.baseline.resolve()
        if not (baseline / "async_handler" / "__init__.py").is_file():
            raise SystemExit(f"--baseline {baseline}: no async_handler package there")
        SERVERS[BASELINE] = Server(
            BASELINE, f"ours at {baseline}", SERVERS[OURS].apps, pythonpath=str(baseline)
        )
        servers.append(SERVERS[BASELINE])
    steps = parse_names(args.scenarios, [*SCENARIOS, RSS_STEP], "scenario")
    scenarios = [SCENARIOS[n] for n in steps if n in SCENARIOS]

    OUT.mkdir(parents=True, exist_ok=True)
    logs = OUT / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    machine = machine_info()
    runs: list[dict[str, Any]] = []
    rss: list[dict[str, Any]] = []
    failures: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        big_file = Path(tmp) / "big.bin"
        settings = Settings(
            duration, rounds, warmup, args.server_core, args.client_core, big_file, logs
        )
        preflight(settings, servers)
        if any(s.name == "file" for s in scenarios):
            write_big_file(big_file, BIG_FILE_SIZE)
        else:
            # Servers check the variable only when the file view runs; any path will do.
            big_file.touch()
        print(f"machine: {machine}")
        print(f"{rounds} round(s) x {duration}s (+{warmup}s warm-up); logs in {logs}")
        for round_no in range(1, rounds + 1):
            order = servers if round_no % 2 else servers[::-1]
            for scenario in scenarios:
                for server in order:
                    if scenario.app not in server.apps:
                        continue
                    try:
                        result = measure_undisturbed(
                            server, scenario, settings, round_no, args.retries, args.max_other
                        )
                    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                        failures.append(f"round {round_no} {scenario.name} {server.name}: {exc}")
                        print(f"FAILED {scenario.name} {server.name}: {exc}", file=sys.stderr)
                        continue
                    runs.append(result)
                    value = (
                        f"{result['gbps']:.2f} GB/s"
                        if scenario.metric == "gbps"
                        else f"{result['rps']:.0f} req/s"
                    )
                    print(
                        f"[{time.monotonic() - started:6.0f}s] round {round_no} "
                        f"{scenario.name:<11} {server.name:<14} {value:>14}  "
                        f"p50 {result['p50_us'] / 1000:.2f} ms  "
                        f"p99 {result['p99_us'] / 1000:.2f} ms  errors {result['errors']}  "
                        f"cpu {result['server_cpu_share']:.0%} "
                        f"other {result['core_other_share']:.0%} "
                        f"steal {result['core_steal_share']:.0%}",
                        flush=True,
                    )
        if RSS_STEP in steps:
            for server in servers:
                if not server.keeps_alive:
                    continue
                try:
                    rss.append(idle_rss(server, settings))
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    failures.append(f"rss {server.name}: {exc}")
                    print(f"FAILED rss {server.name}: {exc}", file=sys.stderr)

    summary = summarize(runs)
    rat = ratios(summary)
    print_table(summary, rat)
    print_rss(rss)
    for run in runs:
        run.pop("wrk_text", None)
    document = {
        "machine": machine,
        "config": {
            "duration_s": duration,
            "rounds": rounds,
            "warmup_s": warmup,
            "server_core": args.server_core,
            "client_core": args.client_core,
            "servers": {s.name: s.label for s in servers},
            "scenarios": {
                s.name: {
                    "label": s.label,
                    "path": s.path,
                    "connections": s.connections,
                    "middleware": s.middleware,
                    "app": s.app,
                    "metric": s.metric,
                }
                for s in scenarios
            },
        },
        "summary": summary,
        "ratios_ours_over": rat,
        "idle_rss": rss,
        "runs": runs,
        "failures": failures,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    write_json(args.json, document)
    print(f"\nwrote {args.json}")
    if summary or rss:
        plot(summary, rss, machine, settings, chart)
        print(f"wrote {chart}")
    if failures:
        print(f"\n{len(failures)} measurement(s) failed:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
