#!/usr/bin/env python3
"""Compare WebSocket servers on echo round-trips and group fan-out (see ``benchmarks/README.md``).

Every measurement starts a fresh one-worker server pinned to one core (``taskset``) and drives it
with ``wsclient.py``, a separate process pinned to another core.  The servers serve the same
three endpoints of ``benchmarks/project``: ours as ``@websocket`` views (``benchsite/ws_views.py``)
under gunicorn with ``AsyncioWorker``; uvicorn and Daphne as Channels ``AsyncWebsocketConsumer``s
(``benchsite/consumers.py``) under ``ProtocolTypeRouter``/``URLRouter`` (``asgi_channels.py``),
with ``InMemoryChannelLayer`` for the group.  Rounds are interleaved and the server order flips
each round, as in ``run.py``, whose process, CPU-accounting and machine helpers this reuses.

Writes ``benchmarks/out/websocket.json`` (every raw run plus the medians and ratios).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Siblings of this script: run.py's process, CPU-accounting and machine helpers are shared
# rather than copied.
from run import (
    OUT,
    PROJECT,
    STARTUP_TIMEOUT_S,
    Running,
    Server,
    children,
    cpu_ticks,
    free_port,
    get,
    log_tail,
    machine_info,
    own_ticks,
    parse_names,
    rss_kib,
    stop_server,
    write_json,
)
from wsreport import SCENARIOS, print_table, ratios, run_errors, summarize, targets

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "wsclient.py"
REPO = HERE.parent
CHANNELS_SETTINGS = "benchsite.settings_channels"


@dataclass(frozen=True)
class WsServer:
    """One server under test: its command line (one worker) and settings module."""

    name: str
    label: str
    settings: str = "benchsite.settings_ws"

    def argv(self, port: int) -> list[str]:
        py = sys.executable
        if self.name == "uvicorn":
            return [
                py, "-m", "uvicorn", "asgi_channels:application", "--ws", "websockets",
                "--host", "127.0.0.1", "--port", str(port), "--app-dir", str(PROJECT),
                "--loop", "uvloop", "--http", "httptools", "--lifespan", "off",
                "--no-access-log", "--log-level", "warning", "--backlog", "2048",
            ]  # fmt: skip
        if self.name == "daphne":
            # Twisted's listen backlog defaults to 50; give it the others' 2048.
            return [
                py, "-m", "daphne", "-e", f"tcp:port={port}:interface=127.0.0.1:backlog=2048",
                "-v", "0", "asgi_channels:application",
            ]  # fmt: skip
        return [
            py, "-m", "gunicorn", "--workers", "1", "--bind", f"127.0.0.1:{port}",
            "--chdir", str(PROJECT), "--log-level", "warning", "--backlog", "2048",
            "--worker-connections", "2000", "--timeout", "120", "--graceful-timeout", "2",
            "--worker-class", "async_handler.worker.AsyncioWorker", "--threads", "8",
            "wsgi_async:application",
        ]  # fmt: skip

    @property
    def single_process(self) -> bool:
        return self.name in ("uvicorn", "daphne")


SERVERS = {
    s.name: s
    for s in [
        WsServer("ours", "ours: AsyncioWorker + @websocket views, in-memory groups"),
        WsServer(
            "ours-layer",
            "ours: AsyncioWorker + @websocket views, groups on InMemoryChannelLayer",
            CHANNELS_SETTINGS,
        ),
        WsServer("uvicorn", "uvicorn --ws websockets + Channels consumers", CHANNELS_SETTINGS),
        WsServer("daphne", "Daphne + Channels consumers", CHANNELS_SETTINGS),
    ]
}
DEFAULT_SERVERS = ["ours", "uvicorn", "daphne"]


@dataclass
class Config:
    duration: float
    warmup: float
    rounds: int
    connections: int
    receivers: int
    broadcasts: int
    server_core: int
    client_core: int
    logs: Path
    py_spy: Path | None


def start(server: WsServer, config: Config, tag: str) -> Running:
    """Start ``server`` pinned to the server core; return once ``GET /hello/`` answers 200."""
    port = free_port()
    env = dict(os.environ, DJANGO_SETTINGS_MODULE=server.settings, BENCH_MIDDLEWARE="stock")
    # This checkout's async_handler first, ahead of whatever the venv has installed.
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), str(PROJECT), env.get("PYTHONPATH")])
    )
    log = config.logs / f"{tag}.log"
    argv = ["taskset", "--cpu-list", str(config.server_core), *server.argv(port)]
    with open(log, "wb") as log_file:
        log_file.write((" ".join(argv) + "\n").encode())
        log_file.flush()
        process = subprocess.Popen(
            argv, cwd=PROJECT, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    running = Running(Server(server.name, server.label, {}), process, port, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{server.name} exited while starting:\n{log_tail(log)}")
        with contextlib.suppress(OSError):
            if get(port, "/hello/", timeout=2.0)[0] == 200:
                break
        if time.monotonic() > deadline:
            stop_server(running)
            raise RuntimeError(f"{server.name} not ready:\n{log_tail(log)}")
        time.sleep(0.05)
    workers = [process.pid] if server.single_process else children(process.pid)
    if len(workers) != 1:
        stop_server(running)
        raise RuntimeError(f"{server.name}: expected 1 worker process, found {workers}")
    running.worker_pid = workers[0]
    return running


@contextlib.contextmanager
def serving(server: WsServer, config: Config, tag: str) -> Iterator[Running]:
    running = start(server, config, tag)
    try:
        yield running
    finally:
        stop_server(running)


def client_argv(scenario: str, port: int, config: Config) -> list[str]:
    argv = [sys.executable, str(CLIENT), "--port", str(port), "--core", str(config.client_core)]
    if scenario == "echo":
        return [
            *argv, "echo", "--connections", str(config.connections),
            "--duration", str(config.duration), "--warmup", str(config.warmup),
        ]  # fmt: skip
    return [
        *argv, "fanout", "--receivers", str(config.receivers),
        "--broadcasts", str(config.broadcasts),
    ]  # fmt: skip


def measure(server: WsServer, scenario: str, config: Config, round_no: int) -> dict[str, Any]:
    """One run: server CPU, other processes' share of its core and worker RSS are read between
    the client's ``MEASURE_START`` and ``MEASURE_END`` (handshakes and warm-up left out)."""
    tag = f"r{round_no}-{scenario}-{server.name}"
    hz = os.sysconf("SC_CLK_TCK")
    with serving(server, config, tag) as running:
        pids = [running.process.pid, *children(running.process.pid)]
        client = subprocess.Popen(
            client_argv(scenario, running.port, config),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert client.stdout is not None
        Mark = tuple[float, tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]
        marks: dict[str, Mark] = {}
        result: dict[str, Any] | None = None
        spy: subprocess.Popen[bytes] | None = None
        rss = 0
        for line in client.stdout:
            if line.startswith("MEASURE_"):
                key = line.strip()
                marks[key] = (
                    time.monotonic(),
                    cpu_ticks(config.server_core),
                    own_ticks(pids),
                    cpu_ticks(config.client_core),
                    own_ticks([client.pid]),
                )
                if key == "MEASURE_START" and config.py_spy is not None:
                    spy = start_py_spy(running.worker_pid, config, tag)
                if key == "MEASURE_END":
                    rss = rss_kib(running.worker_pid)
                    if spy is not None:
                        spy.send_signal(2)  # SIGINT: py-spy writes its profile and exits
            elif line.startswith("WSCLIENT_JSON "):
                result = json.loads(line.removeprefix("WSCLIENT_JSON "))
        stderr = client.stderr.read() if client.stderr else ""
        client.wait()
        if spy is not None:
            spy.wait(30)
        alive = running.process.poll() is None
    if client.returncode != 0 or result is None or len(marks) != 2:
        raise RuntimeError(f"wsclient failed ({client.returncode}):\n{stderr[-3000:]}")
    (t0, (user0, steal0), (own_u0, own_s0), (c_user0, _), (cl_u0, _)) = marks["MEASURE_START"]
    (t1, (user1, steal1), (own_u1, own_s1), (c_user1, _), (cl_u1, _)) = marks["MEASURE_END"]
    elapsed = t1 - t0
    own_user = own_u1 - own_u0
    client_other = max(0, (c_user1 - c_user0) - (cl_u1 - cl_u0)) / hz / elapsed
    result.update(
        server=server.name,
        round=round_no,
        server_alive_at_end=alive,
        worker_rss_kib=rss,
        server_cpu_share=(own_user + own_s1 - own_s0) / hz / elapsed,
        # As in run.py: user time on the server's core that the server did not use.
        core_other_share=max(0, (user1 - user0) - own_user) / hz / elapsed,
        core_steal_share=(steal1 - steal0) / hz / elapsed,
        # The same on the client's core: a disturbed client understates every server alike.
        client_core_other_share=client_other,
    )
    return result


def start_py_spy(pid: int, config: Config, tag: str) -> subprocess.Popen[bytes]:
    assert config.py_spy is not None
    config.py_spy.mkdir(parents=True, exist_ok=True)
    # The venv's own py-spy when the venv is not activated.
    beside = Path(sys.executable).parent / "py-spy"
    program = str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"
    argv = [
        program, "record", "--pid", str(pid), "--nonblocking", "--format", "raw",
        "--output", str(config.py_spy / f"{tag}.txt"),
    ]  # fmt: skip
    with open(config.logs / f"{tag}.py-spy.log", "wb") as log:
        return subprocess.Popen(
            ["taskset", "--cpu-list", str(config.client_core), *argv],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def measure_undisturbed(
    server: WsServer, scenario: str, config: Config, round_no: int, retries: int, max_other: float
) -> dict[str, Any]:
    """``measure``, repeated up to ``retries`` times while other jobs took the server's core."""
    for attempt in range(retries + 1):
        result = measure(server, scenario, config, round_no)
        result["attempts"] = attempt + 1
        result["disturbed"] = result["core_other_share"] > max_other
        if not result["disturbed"]:
            break
        if attempt < retries:
            print(
                f"  {scenario} {server.name}: other processes used "
                f"{result['core_other_share']:.0%} of core {config.server_core}; measuring again",
                flush=True,
            )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 3 s echo, 30 broadcasts")
    parser.add_argument("--duration", type=float, help="seconds of measured echo (default 10)")
    parser.add_argument("--warmup", type=float, help="seconds of echo warm-up (default 2)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds; medians (default 3)")
    parser.add_argument("--connections", type=int, default=100, help="echo sockets (100)")
    parser.add_argument("--receivers", type=int, default=1000, help="fan-out sockets (1000)")
    parser.add_argument("--broadcasts", type=int, help="measured broadcasts (default 100)")
    parser.add_argument(
        "--servers", help=f"subset of {', '.join(SERVERS)} (default {','.join(DEFAULT_SERVERS)})"
    )
    parser.add_argument("--scenarios", help=f"subset of {', '.join(SCENARIOS)}")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument("--max-other", type=float, default=0.10)
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--json", type=Path, default=OUT / "websocket.json")
    parser.add_argument("--py-spy", type=Path, help="record each run's worker with py-spy here")
    parser.add_argument("--report", type=Path, help="print the table of a saved JSON; run nothing")
    args = parser.parse_args(argv)
    if args.report is not None:
        saved = json.loads(args.report.read_text())
        summary = summarize(saved["runs"], list(SERVERS))
        print_table(summary, ratios(summary))
        print(f"targets: {targets(ratios(summary))}")
        return 0

    config = Config(
        duration=args.duration or (3.0 if args.quick else 10.0),
        warmup=args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0),
        rounds=args.rounds or (1 if args.quick else 3),
        connections=args.connections,
        receivers=args.receivers,
        broadcasts=args.broadcasts or (30 if args.quick else 100),
        server_core=args.server_core,
        client_core=args.client_core,
        logs=OUT / "logs-websocket",
        py_spy=args.py_spy,
    )
    names = parse_names(args.servers or ",".join(DEFAULT_SERVERS), list(SERVERS), "server")
    servers = [SERVERS[n] for n in names]
    scenarios = parse_names(args.scenarios, SCENARIOS, "scenario")
    preflight(config)
    config.logs.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    for dist in ("channels", "daphne", "websockets", "twisted"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            machine["versions"][dist] = importlib.metadata.version(dist)
    print(f"machine: {machine}")
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    started = time.monotonic()
    for round_no in range(1, config.rounds + 1):
        order = servers if round_no % 2 else servers[::-1]
        for scenario in scenarios:
            for server in order:
                try:
                    r = measure_undisturbed(
                        server, scenario, config, round_no, args.retries, args.max_other
                    )
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    failures.append(f"round {round_no} {scenario} {server.name}: {exc}")
                    print(f"FAILED {scenario} {server.name}: {exc}", file=sys.stderr)
                    continue
                runs.append(r)
                rate = f"{r['msgs_per_s']:.0f} msgs/s" if scenario == "echo" else ""
                print(
                    f"[{time.monotonic() - started:5.0f}s] round {round_no} {scenario:<6} "
                    f"{server.name:<10} {rate:>13} p50 {r['p50_us'] / 1000:.2f} ms "
                    f"p99 {r['p99_us'] / 1000:.2f} ms errors {run_errors(r)} "
                    f"cpu {r['server_cpu_share']:.0%} other {r['core_other_share']:.0%} "
                    f"client {r['client_cpu_share']:.0%} "
                    f"(other {r['client_core_other_share']:.0%})",
                    flush=True,
                )
    summary = summarize(runs, list(SERVERS))
    rat = ratios(summary)
    goals = targets(rat)
    print_table(summary, rat)
    print(f"targets: {goals}")
    document = {
        "machine": machine,
        "config": {**vars(config), "logs": str(config.logs), "py_spy": str(config.py_spy)},
        "servers": {s.name: s.label for s in servers},
        "summary": summary,
        "ratios_over_uvicorn": rat,
        "targets": goals,
        "runs": runs,
        "failures": failures,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    write_json(args.json, document)
    print(f"wrote {args.json}")
    for failure in failures:
        print(f"  failed: {failure}", file=sys.stderr)
    return 1 if failures or any(run_errors(r) for r in runs) else 0


def preflight(config: Config) -> None:
    """Packages, ``taskset``, the two cores, and file descriptors for 1,000 sockets a side."""
    needed = {"channels", "daphne", "uvicorn", "uvloop", "httptools", "gunicorn", "websockets"}
    missing = sorted(m for m in needed if importlib.util.find_spec(m) is None)
    if missing:
        raise SystemExit(f"missing packages: {', '.join(missing)} (pip install -e '.[bench]')")
    if shutil.which("taskset") is None:
        raise SystemExit("taskset not found on PATH (Debian: apt-get install util-linux)")
    cores = os.sched_getaffinity(0)
    for core in (config.server_core, config.client_core):
        if core not in cores:
            raise SystemExit(f"core {core} is not available to this process (have {sorted(cores)})")
    if config.server_core == config.client_core:
        raise SystemExit("--server-core and --client-core must differ")
    # The servers inherit it: each holds every socket of a run, plus its listening backlog.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * config.receivers + 1024
    if soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


if __name__ == "__main__":
    sys.exit(main())
