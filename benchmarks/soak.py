"""Soak test: our gunicorn worker on the Django test project, at ~80% of capacity, for minutes.

    .venv/bin/python benchmarks/soak.py                    # 600 s
    .venv/bin/python benchmarks/soak.py --seconds 60 --json out.json

One worker (``--threads 8`` by default) serves ``tests.djproject.wsgi:application`` with its
full middleware chain, against PostgreSQL (the ``pg`` alias, ``CONN_MAX_AGE=60``, a unique
``application_name`` per run).  The load is a mix of async views, sync views using PostgreSQL,
async views using PostgreSQL through ``sync_to_async``, streaming responses (sync and async
iterators) and multipart uploads (32 KiB, and 2 MiB ones that the server spools to disk), about
one in ten on a new connection; every response body is checked.

Phases: start; *capacity* (closed loop, as fast as the client can go); *warm-up* at the target
rate; *idle* (clients disconnect; baseline descriptors and PostgreSQL sessions); *soak* at the
target rate (``--load`` times capacity), sampling the worker's RSS (``/proc/<pid>/status``),
open descriptors (``/proc/<pid>/fd``) and PostgreSQL sessions every ``--sample`` seconds;
*idle* again.  Pass criteria, checked at the end:

* 0 errors (status, body, or connection) in warm-up and soak;
* RSS growth < ``--max-rss-growth`` (5%) from the end of warm-up to the end of the soak (median of
  the first and last five samples);
* after the soak, descriptors other than PostgreSQL sessions are back to the idle baseline;
* PostgreSQL sessions for the worker: at most ``--threads`` at rest (before and after the soak);
  under load at most one more per in-flight request (``--connections``), for the async views
  that query the database behind a sync-only middleware on an overflow thread, whose
  connections close when their request ends (README, "A sync-only middleware costs a thread").

Prints a summary; exits 0 on pass, 1 on failure, 2 when it cannot run (no PostgreSQL).  The
client runs in this process on asyncio (uvloop when installed) and shares the machine with the
server, so "capacity" is that of the pair.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.reliability import (  # noqa: E402
    HttpConnection,
    fd_count,
    fd_kinds,
    percentile,
    pg_sessions,
    pg_unavailable,
    rss_kib,
)

APP = "tests.djproject.wsgi:application"


# ---------------------------------------------------------------------------------------------
# The request mix: (name, weight, call) where call(conn, close) does one request and raises
# AssertionError on a wrong answer.


class WrongAnswer(AssertionError):
    """The server answered, but not what the view produces."""


def _expect(status: int, body: bytes, want: bytes, what: str) -> None:
    if status != 200:
        raise WrongAnswer(f"{what}: status {status}, body {body[:200]!r}")
    if body != want:
        raise WrongAnswer(f"{what}: body {body[:200]!r} != {want[:200]!r}")


def _get(path: str, want: bytes) -> Callable[[HttpConnection, bool], Awaitable[None]]:
    async def call(conn: HttpConnection, close: bool) -> None:
        status, _, body = await conn.request("GET", path, close=close)
        _expect(status, body, want, path)

    return call


_BOUNDARY = "soak-boundary-7d1f"
_SMALL = os.urandom(32 * 1024)
_LARGE = os.urandom(2 * 1024 * 1024)  # over the worker's 1 MiB spool threshold: a temp file


def _upload(path: str, blob: bytes) -> Callable[[HttpConnection, bool], Awaitable[None]]:
    digest = hashlib.sha256(blob).hexdigest()
    body = (
        (
            f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="note"\r\n\r\nsoak\r\n'
            f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="blob.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        + blob
        + f"\r\n--{_BOUNDARY}--\r\n".encode()
    )
    headers = [("Content-Type", f"multipart/form-data; boundary={_BOUNDARY}")]

    async def call(conn: HttpConnection, close: bool) -> None:
        status, _, answer = await conn.request(
            "POST", path, headers=headers, body=body, close=close
        )
        if status != 200:
            raise WrongAnswer(f"upload {path}: status {status}, body {answer[:200]!r}")
        data = json.loads(answer)
        if data["FILES"].get("file") != ["blob.bin", len(blob), digest]:
            raise WrongAnswer(f"upload {path}: FILES {data['FILES']!r}")
        if data["POST"].get("note") != ["soak"]:
            raise WrongAnswer(f"upload {path}: POST {data['POST']!r}")

    return call


MIX: list[tuple[str, int, Callable[[HttpConnection, bool], Awaitable[None]]]] = [
    ("async hello", 20, _get("/async/hello/", b"Hello, async world")),
    ("async wait 20ms", 10, _get("/async/wait/?s=0.02", b"waited")),
    ("sync hello", 10, _get("/sync/hello/", b"Hello, sync world")),
    ("sync db", 20, _get("/sync/db/?s=0", b"db ok")),
    ("async db", 10, _get("/async/db/", b"db ok")),
    (
        "async stream",
        8,
        _get("/async/stream/", b"".join(f"async chunk {i}\n".encode() for i in range(5))),
    ),
    (
        "sync stream",
        6,
        _get("/sync/stream/", b"".join(f"sync chunk {i}\n".encode() for i in range(5))),
    ),
    ("upload 32k sync", 8, _upload("/sync/echo/", _SMALL)),
    ("upload 32k async", 6, _upload("/async/echo/", _SMALL)),
    ("upload 2M", 2, _upload("/sync/echo/", _LARGE)),
]


# ---------------------------------------------------------------------------------------------
# Load generation


@dataclasses.dataclass
class Tally:
    """Requests done and failed in one phase."""

    done: int = 0
    errors: int = 0
    by_kind: dict[str, int] = dataclasses.field(default_factory=dict)
    samples: list[str] = dataclasses.field(default_factory=list)
    latencies: list[float] = dataclasses.field(default_factory=list)
    max_lag: float = 0.0

    def fail(self, what: str) -> None:
        self.errors += 1
        if len(self.samples) < 10:
            self.samples.append(what)


class Load:
    """``connections`` client tasks; open loop at ``rate`` req/s, or closed loop if None."""

    def __init__(self, host: str, port: int, connections: int, seed: int) -> None:
        self.host = host
        self.port = port
        self.connections = connections
        self.rng = random.Random(seed)
        self.weights = [w for _, w, _ in MIX]

    async def run(self, seconds: float, rate: float | None, tally: Tally) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + seconds
        ticket = 0

        async def client() -> None:
            nonlocal ticket
            conn = HttpConnection(self.host, self.port)
            try:
                while True:
                    if rate is not None:
                        due = start + ticket / rate
                        ticket += 1
                        if due >= end:
                            return
                        now = loop.time()
                        if due > now:
                            await asyncio.sleep(due - now)
                        else:
                            tally.max_lag = max(tally.max_lag, now - due)
                    elif loop.time() >= end:
                        return
                    name, _, call = self.rng.choices(MIX, self.weights)[0]
                    close = self.rng.random() < 0.1
                    began = time.perf_counter()
                    try:
                        await asyncio.wait_for(call(conn, close), 30)
                    except Exception as exc:  # every failure is counted, whatever it is
                        tally.fail(f"{name}: {exc!r}"[:300])
                        await conn.close()
                        continue
                    tally.done += 1
                    tally.by_kind[name] = tally.by_kind.get(name, 0) + 1
                    tally.latencies.append(time.perf_counter() - began)
            finally:
                await conn.close()

        await asyncio.gather(*(client() for _ in range(self.connections)))


# ---------------------------------------------------------------------------------------------
# The server


class Worker:
    """gunicorn with our worker class on a free loopback port, one worker process."""

    def __init__(self, threads: int, appname: str, middleware: str, log_dir: Path) -> None:
        self.threads = threads
        self.appname = appname
        self.middleware = middleware
        self.log_path = log_dir / "gunicorn.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.pid = 0

    def start(self, timeout: float = 30.0) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        env["PG_APPNAME"] = self.appname
        if self.middleware == "async":
            env["DJPROJECT_MIDDLEWARE"] = "async"
        else:
            env.pop("DJPROJECT_MIDDLEWARE", None)
        env.pop("DJANGO_SETTINGS_MODULE", None)
        # glibc raises its mmap threshold after the first large buffer is freed (mallopt(3),
        # M_MMAP_THRESHOLD), so later 2 MiB upload bodies come from per-thread heaps that are
        # never trimmed: RSS then steps up by megabytes as each pool thread first meets one,
        # whenever that happens (a one-minute soak measured +9.8%, where this gives -0.1%).
        # A fixed threshold keeps big buffers in mmap, returned at free; a leaked one still
        # counts in RSS, so this hides allocator noise, not leaks.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
        # Overflow threads (issue 11) start under load, and glibc gives each new thread its own
        # malloc arena, another step in RSS that is no leak: cap the arenas too.
        env.setdefault("MALLOC_ARENA_MAX", "2")
        cmd = [
            sys.executable, "-m", "gunicorn",
            "-k", "async_handler.worker.AsyncioWorker",
            "-b", f"127.0.0.1:{self.port}",
            "--workers", "1",
            "--threads", str(self.threads),
            "--worker-connections", "2000",
            "--timeout", "60",
            "--log-level", "warning",
            APP,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited early:\n{self.log_tail()}")
            try:
                self.pid = asyncio.run(self._observe_pid())
                return
            except (OSError, asyncio.IncompleteReadError, ValueError, KeyError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"gunicorn did not serve in {timeout}s:\n{self.log_tail()}"
                    ) from exc
                time.sleep(0.1)

    async def _observe_pid(self) -> int:
        conn = HttpConnection("127.0.0.1", self.port)
        try:
            status, _, body = await conn.request("GET", "/observe/storm/", close=True)
        finally:
            await conn.close()
        if status != 200:
            raise ValueError(f"/observe/storm/ answered {status}")
        pid: int = json.loads(body)["pid"]
        return pid

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# Sampling and the run


@dataclasses.dataclass
class Sample:
    t: float
    rss_kib: int
    fds: int
    pg: int
    done: int
    errors: int


async def _sampler(
    worker: Worker, tally: Tally, every: float, out: list[Sample], t0: float
) -> None:
    loop = asyncio.get_running_loop()
    while True:
        pg = await loop.run_in_executor(None, pg_sessions, worker.appname)
        out.append(
            Sample(
                t=round(time.monotonic() - t0, 2),
                rss_kib=rss_kib(worker.pid),
                fds=fd_count(worker.pid),
                pg=pg,
                done=tally.done,
                errors=tally.errors,
            )
        )
        await asyncio.sleep(every)


async def _idle_snapshot(worker: Worker, timeout: float = 15.0) -> dict[str, Any]:
    """Descriptors and sessions once the worker has closed every client connection."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    previous = -1
    stable = 0
    while True:
        fds = fd_count(worker.pid)
        stable = stable + 1 if fds == previous else 0
        previous = fds
        if stable >= 5 or loop.time() > deadline:
            break
        await asyncio.sleep(0.2)
    pg = await loop.run_in_executor(None, pg_sessions, worker.appname)
    return {"fds": fds, "pg": pg, "kinds": fd_kinds(worker.pid), "rss_kib": rss_kib(worker.pid)}


def _uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every phase; return the report (``report["passed"]`` tells the verdict)."""
    appname = f"ah_soak_{uuid.uuid4().hex[:10]}"
    log_dir = Path(tempfile.mkdtemp(prefix="ah-soak-"))
    worker = Worker(args.threads, appname, args.middleware, log_dir)
    report: dict[str, Any] = {
        "seconds": args.seconds,
        "threads": args.threads,
        "middleware": args.middleware,
        "connections": args.connections,
        "load": args.load,
        "pg_appname": appname,
        "log": str(worker.log_path),
    }
    _uvloop()
    worker.start()
    try:
        report["pid"] = worker.pid
        report["start_rss_kib"] = rss_kib(worker.pid)
        load = Load("127.0.0.1", worker.port, args.connections, args.seed)

        print(f"[soak] worker pid {worker.pid} on port {worker.port}; measuring capacity "
              f"for {args.capacity_seconds:.0f} s", flush=True)  # fmt: skip
        capacity = Tally()
        asyncio.run(load.run(args.capacity_seconds, None, capacity))
        rps = capacity.done / args.capacity_seconds
        report["capacity_rps"] = round(rps, 1)
        report["capacity_errors"] = capacity.errors
        rate = max(1.0, args.load * rps)
        report["target_rps"] = round(rate, 1)
        print(f"[soak] capacity {rps:.0f} req/s ({capacity.errors} errors); target "
              f"{rate:.0f} req/s; warm-up {args.warmup:.0f} s", flush=True)  # fmt: skip

        warm = Tally()
        asyncio.run(load.run(args.warmup, rate, warm))
        report["warmup"] = {"done": warm.done, "errors": warm.errors, "samples": warm.samples}
        baseline = asyncio.run(_idle_snapshot(worker))
        report["idle_before"] = baseline
        print(f"[soak] warm-up done ({warm.done} requests, {warm.errors} errors); idle "
              f"baseline {baseline}; soaking {args.seconds:.0f} s", flush=True)  # fmt: skip

        soak = Tally()
        samples: list[Sample] = []

        async def soak_phase() -> None:
            t0 = time.monotonic()
            sampler = asyncio.ensure_future(_sampler(worker, soak, args.sample, samples, t0))
            progress = asyncio.ensure_future(_progress(samples, args.seconds))
            try:
                await load.run(args.seconds, rate, soak)
            finally:
                sampler.cancel()
                progress.cancel()
                await asyncio.gather(sampler, progress, return_exceptions=True)
            samples.append(
                Sample(
                    t=round(time.monotonic() - t0, 2),
                    rss_kib=rss_kib(worker.pid),
                    fds=fd_count(worker.pid),
                    pg=pg_sessions(worker.appname),
                    done=soak.done,
                    errors=soak.errors,
                )
            )

        asyncio.run(soak_phase())
        after = asyncio.run(_idle_snapshot(worker))
        report["idle_after"] = after
        report["soak"] = {
            "done": soak.done,
            "errors": soak.errors,
            "error_samples": soak.samples,
            "achieved_rps": round(soak.done / args.seconds, 1),
            "by_kind": soak.by_kind,
            "latency_ms": {
                "p50": round(percentile(soak.latencies, 50) * 1000, 2),
                "p99": round(percentile(soak.latencies, 99) * 1000, 2),
                "max": round(max(soak.latencies, default=0.0) * 1000, 2),
            },
            "max_schedule_lag_ms": round(soak.max_lag * 1000, 1),
        }
        report["samples"] = [dataclasses.asdict(s) for s in samples]
        report["worker_alive"] = worker.proc is not None and worker.proc.poll() is None
        report["same_worker"] = asyncio.run(worker._observe_pid()) == worker.pid
    finally:
        worker.stop()
    return _verdict(report, args)


async def _progress(samples: list[Sample], seconds: float) -> None:
    while True:
        await asyncio.sleep(max(10.0, seconds / 10))
        if samples:
            s = samples[-1]
            print(f"[soak] t={s.t:.0f}s done={s.done} errors={s.errors} rss={s.rss_kib} KiB "
                  f"fds={s.fds} pg={s.pg}", flush=True)  # fmt: skip


def _verdict(report: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    samples = report["samples"]
    failures: list[str] = []
    errors = report["warmup"]["errors"] + report["soak"]["errors"]
    if errors:
        failures.append(f"{errors} request errors: {report['soak']['error_samples'][:3]}")
    head = [s["rss_kib"] for s in samples[:5]]
    tail = [s["rss_kib"] for s in samples[-5:]]
    rss_start = statistics.median(head)
    rss_end = statistics.median(tail)
    growth = (rss_end - rss_start) / rss_start
    report["rss"] = {
        "after_warmup_kib": rss_start,
        "end_kib": rss_end,
        "max_kib": max(s["rss_kib"] for s in samples),
        "growth_pct": round(growth * 100, 2),
    }
    if growth >= args.max_rss_growth:
        failures.append(f"RSS grew {growth:.1%} ({rss_start} -> {rss_end} KiB)")
    before, after = report["idle_before"], report["idle_after"]
    # A PostgreSQL session is one socket in the worker; CONN_MAX_AGE may have replaced some.
    fds_before = before["fds"] - before["pg"]
    fds_after = after["fds"] - after["pg"]
    report["fds"] = {
        "idle_before": before["fds"],
        "idle_after": after["fds"],
        "non_pg_before": fds_before,
        "non_pg_after": fds_after,
        "max_during": max(s["fds"] for s in samples),
    }
    if fds_after > fds_before:
        failures.append(
            f"descriptors not back to baseline: {fds_before} -> {fds_after} besides PostgreSQL "
            f"({before['kinds']} -> {after['kinds']})"
        )
    pg_max = max([s["pg"] for s in samples] + [before["pg"], after["pg"]])
    report["pg_sessions_max"] = pg_max
    pg_rest = max(before["pg"], after["pg"])
    if pg_rest > report["threads"]:
        failures.append(f"{pg_rest} PostgreSQL sessions at rest for {report['threads']} threads")
    if pg_max > report["threads"] + report["connections"]:
        failures.append(
            f"{pg_max} PostgreSQL sessions under load for {report['threads']} threads and "
            f"{report['connections']} client connections"
        )
    if not report["worker_alive"] or not report["same_worker"]:
        failures.append("the worker process died or was replaced during the run")
    report["failures"] = failures
    report["passed"] = not failures
    return report


def _summary(report: dict[str, Any]) -> str:
    soak = report["soak"]
    lat = soak["latency_ms"]
    lines = [
        "== soak summary ==",
        f"duration       {report['seconds']:.0f} s soak after {report['warmup']['done']} "
        "warm-up requests",
        f"worker         pid {report['pid']}, --threads {report['threads']}, "
        f"{report['middleware']} middleware, {report['connections']} client connections",
        f"capacity       {report['capacity_rps']} req/s; target {report['target_rps']} req/s "
        f"({report['load']:.0%}); achieved {soak['achieved_rps']} req/s",
        f"requests       {soak['done']} ok, {soak['errors']} errors "
        f"(+ warm-up {report['warmup']['errors']} errors)",
        f"latency        p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms",
        f"RSS            {report['start_rss_kib']} KiB at start, "
        f"{report['rss']['after_warmup_kib']} KiB after warm-up, "
        f"{report['rss']['end_kib']} KiB at end (max {report['rss']['max_kib']}): "
        f"{report['rss']['growth_pct']}%",
        f"descriptors    idle {report['fds']['idle_before']} before, "
        f"{report['fds']['idle_after']} after (without PostgreSQL sockets "
        f"{report['fds']['non_pg_before']} -> {report['fds']['non_pg_after']}); "
        f"max {report['fds']['max_during']} under load",
        f"PostgreSQL     max {report['pg_sessions_max']} sessions for {report['threads']} threads "
        f"and {report['connections']} connections",
        f"mix            {soak['by_kind']}",
        "verdict        "
        + ("PASS" if report["passed"] else "FAIL: " + "; ".join(report["failures"])),
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="soak duration")
    parser.add_argument("--warmup", type=float, default=None,
                        help="warm-up seconds at the target rate (default: 10%% of --seconds, "
                        "between 15 and 60)")  # fmt: skip
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.8, help="fraction of capacity")
    parser.add_argument("--threads", type=int, default=8, help="gunicorn --threads")
    parser.add_argument("--connections", type=int, default=32, help="client connections")
    parser.add_argument("--middleware", choices=("full", "async"), default="full")
    parser.add_argument("--sample", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--max-rss-growth", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(60.0, max(15.0, args.seconds / 10))
    for name in ("seconds", "warmup", "capacity_seconds", "load", "sample"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.threads < 1 or args.connections < 1:
        parser.error("--threads and --connections must be at least 1")
    reason = pg_unavailable()
    if reason is not None:
        print(f"[soak] cannot run: {reason}", file=sys.stderr)
        return 2
    report = run(args)
    print(_summary(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"[soak] report written to {args.json}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
