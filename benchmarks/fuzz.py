"""Long-running protocol fuzzing: the properties of ``tests/test_fuzz_protocol.py``, for longer.

Runs hypothesis in batches until ``--minutes`` have passed or ``--examples`` examples ran,
alternating the two properties (valid pipelines split anywhere; mutated streams ended by
silence, EOF or a drop) and the two application kinds (contract app on the loop, plain WSGI app
on a pool thread).  Prints the number of examples, how the mutated streams ended (statuses
answered, silent closes) and every failure with its falsifying example; exits 1 on any failure.

    .venv/bin/python benchmarks/fuzz.py --minutes 5
    .venv/bin/python benchmarks/fuzz.py --examples 20000
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_handler.threads import ThreadPool
from tests.reliability import (
    APP_KINDS,
    QUIET_CONFIG,
    SHORT_CONFIG,
    RequestSpec,
    cut,
    expected_observation,
    mutated_streams,
    pipelines,
    run_stream,
    stream_problems,
)


def cut_points(size: int) -> st.SearchStrategy[list[int]]:
    return st.one_of(st.lists(st.integers(0, size), max_size=12), st.just(list(range(size))))


class Fuzzer:
    """Counts examples and outcomes across batches."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool
        self.examples: collections.Counter[str] = collections.Counter()
        self.endings: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []

    def valid(self, kind: str, requests: list[RequestSpec], data: st.DataObject) -> None:
        # Every wait inside an example is bounded; a stack dump means a hang to report.
        faulthandler.dump_traceback_later(60)
        stream = b"".join(spec.wire() for spec in requests)
        expected = [expected_observation(spec) for spec in requests]
        points = data.draw(cut_points(len(stream)), label="cut points")
        # Counted once every draw succeeded: hypothesis may abandon an example inside a draw.
        self.examples["valid"] += 1
        for chunks in ([stream], cut(stream, points)):
            outcome = run_stream(
                kind, chunks, self.pool, config=QUIET_CONFIG, end="eof", responses=len(requests)
            )
            assert stream_problems(outcome, client_stayed=True) == [], (stream, chunks)
            assert outcome.seen == expected, (stream, chunks, outcome.seen, expected)
            assert [r.status for r in outcome.finals] == [200] * len(requests), outcome.output

    def mutated(self, kind: str, stream: bytes, end: str, data: st.DataObject) -> None:
        faulthandler.dump_traceback_later(60)
        chunks = cut(stream, data.draw(cut_points(len(stream)), label="cut points"))
        self.examples["mutated"] += 1
        outcome = run_stream(kind, chunks, self.pool, config=SHORT_CONFIG, end=end)
        statuses = [r.status for r in outcome.finals]
        self.endings[f"{end}: " + (",".join(map(str, sorted(set(statuses)))) or "no response")] += 1
        problems = stream_problems(outcome, client_stayed=end == "none")
        assert problems == [], (stream, chunks, outcome.output, problems)

    def batch(self, which: str, size: int) -> None:
        common = settings(
            max_examples=size,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        test: Any
        if which == "valid":
            test = given(kind=st.sampled_from(APP_KINDS), requests=pipelines(), data=st.data())(
                self.valid
            )
        else:
            test = given(
                kind=st.sampled_from(APP_KINDS),
                stream=mutated_streams(),
                end=st.sampled_from(["none", "none", "eof", "lost"]),
                data=st.data(),
            )(self.mutated)
        try:
            common(test)()
        except Exception:
            failure = f"[{which}] " + traceback.format_exc()
            self.failures.append(failure)
            print(failure, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=None, help="run for this long")
    parser.add_argument("--examples", type=int, default=None, help="stop after this many")
    parser.add_argument("--batch", type=int, default=200, help="examples per hypothesis run")
    args = parser.parse_args(argv)
    if args.minutes is None and args.examples is None:
        args.minutes = 5.0
    if (args.minutes is not None and args.minutes <= 0) or (
        args.examples is not None and args.examples <= 0
    ):
        parser.error("--minutes and --examples must be positive")
    faulthandler.register(signal.SIGUSR1)
    pool = ThreadPool(4, name="fuzz")
    fuzzer = Fuzzer(pool)
    started = time.monotonic()
    deadline = started + args.minutes * 60 if args.minutes is not None else float("inf")
    limit = args.examples if args.examples is not None else sys.maxsize
    turn = 0
    try:
        while time.monotonic() < deadline and sum(fuzzer.examples.values()) < limit:
            which = "mutated" if turn % 3 else "valid"  # two mutated batches per valid one
            turn += 1
            fuzzer.batch(which, min(args.batch, limit - sum(fuzzer.examples.values())))
            elapsed = time.monotonic() - started
            print(
                f"{elapsed:7.1f}s  examples {dict(fuzzer.examples)}  "
                f"failures {len(fuzzer.failures)}",
                flush=True,
            )
    finally:
        pool.shutdown(wait=True, timeout=5)
    elapsed = time.monotonic() - started
    total = sum(fuzzer.examples.values())
    print("\n== fuzz summary ==")
    print(f"duration      {elapsed:.1f} s")
    print(f"examples      {total} ({dict(fuzzer.examples)}; {total / elapsed:.1f}/s)")
    print("mutated streams ended (client behaviour: statuses answered):")
    for ending, count in sorted(fuzzer.endings.items()):
        print(f"  {ending:40s} {count}")
    print(f"failures      {len(fuzzer.failures)}")
    return 1 if fuzzer.failures else 0


if __name__ == "__main__":
    sys.exit(main())
