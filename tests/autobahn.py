"""Autobahn|Testsuite cases against a WebSocket server, run by ``kosoku``, and their verdicts.

``kosoku`` (PyPI) drives Autobahn's own case files (framing, pings, fragmentation, UTF-8,
closing handshake, limits, permessage-deflate) from its CLI and writes Autobahn's report
format: ``index.json`` maps the agent (the server's ``Server`` header) to
``{case id: {"behavior", "behaviorClose", "remoteCloseCode", "duration", "reportfile"}}``, and
one JSON file per case holds the details (``result``, ``resultClose``, the wire log).

:func:`run` runs a selection of cases and :func:`read_report` parses what it wrote; both
``tests/test_websocket_autobahn.py`` (a bounded run under a real gunicorn worker) and
``scripts/autobahn`` (the full run, ours or uvicorn's) use them.

Autobahn numbers its case groups 1-7, 9, 10, 12 and 13 (there is no 8 or 11).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "ALL_CASES",
    "BEHAVIOURS",
    "KOSOKU_CASE_CAP",
    "CaseOutcome",
    "KosokuError",
    "Report",
    "case_ids",
    "case_sort_key",
    "kosoku_command",
    "log_alarms",
    "read_report",
    "run",
]

#: Every case group kosoku ships, as ``-i`` patterns: the whole suite.
ALL_CASES: tuple[str, ...] = tuple(f"{group}.*" for group in (1, 2, 3, 4, 5, 6, 7, 9, 10, 12, 13))

#: Autobahn's verdicts for a case's message exchange, best first.  ``NON-STRICT`` and
#: ``INFORMATIONAL`` pass (a SHOULD not followed, behaviour the RFC leaves open);
#: ``UNIMPLEMENTED`` means an optional feature (permessage-deflate) was not negotiated.
BEHAVIOURS: tuple[str, ...] = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")

# Verdicts on the closing handshake that pass; the others are "FAILED", "FAILED BY CLIENT",
# "WRONG CODE" and "UNCLEAN".
_CLOSE_PASSES = frozenset({"OK", "INFORMATIONAL"})


#: kosoku ends any case after this many seconds, whatever the case's own timeout: its report
#: then says "Case did not finish within N seconds." (N being the case's timeout, 60 to 480 s for
#: 12.x/13.x) with a duration of about 20000 ms.  Found by timing an echo slowed to 25 ms a
#: message: 12.1.1 (1000 messages, own timeout 60 s) FAILED at 19997 ms.
KOSOKU_CASE_CAP = 20.0

# What a crashed, killed or replaced gunicorn worker leaves in the log.
_ALARMS = re.compile(
    r"Traceback|Worker exiting|WORKER TIMEOUT|Worker \(pid:\d+\) (?:was sent|exited)|"
    r"\[(?:ERROR|CRITICAL)\]"
)


def log_alarms(log: str) -> list[str]:
    """The lines of a gunicorn log that tell of a worker crash, kill, restart or error; a
    second ``Booting worker`` line counts (the arbiter replaced the worker)."""
    lines = [line for line in log.splitlines() if _ALARMS.search(line)]
    boots = [line for line in log.splitlines() if "Booting worker" in line]
    return lines + boots[1:]


class KosokuError(RuntimeError):
    """kosoku did not produce a report (bad arguments, no server, a crash)."""


@dataclasses.dataclass(frozen=True)
class CaseOutcome:
    """What Autobahn concluded about one case."""

    case: str
    behavior: str
    behavior_close: str
    remote_close_code: int | None
    #: Milliseconds, as kosoku measured the case.
    duration: int
    #: Autobahn's explanation of ``behavior`` and of ``behavior_close`` (from the case file).
    result: str = ""
    result_close: str = ""

    @property
    def failed(self) -> bool:
        """Whether the case failed, on the messages or on the closing handshake.

        ``ERROR`` (kosoku could not run the case to a verdict) counts as a failure too.
        """
        return self.behavior in ("FAILED", "ERROR") or self.behavior_close not in _CLOSE_PASSES

    @property
    def ok(self) -> bool:
        """Whether both verdicts are exactly ``OK``."""
        return self.behavior == "OK" and self.behavior_close == "OK"


def case_sort_key(case: str) -> tuple[int, ...]:
    """``1.2.10`` after ``1.2.9``."""
    return tuple(int(part) for part in case.split("."))


@dataclasses.dataclass
class Report:
    """The outcome of one kosoku run: one agent (server), its cases in Autobahn order."""

    agent: str
    cases: dict[str, CaseOutcome]
    outdir: Path
    #: Wall-clock seconds the run took (``0.0`` when read back from a directory).
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        """Cases per ``behavior``, every verdict of :data:`BEHAVIOURS` present (maybe 0)."""
        counter = collections.Counter(outcome.behavior for outcome in self.cases.values())
        counts = {behaviour: counter.pop(behaviour, 0) for behaviour in BEHAVIOURS}
        counts.update(counter)  # anything unexpected ("ERROR") stays visible
        return counts

    def failures(self) -> list[CaseOutcome]:
        """The cases that failed (see :attr:`CaseOutcome.failed`)."""
        return [outcome for outcome in self.cases.values() if outcome.failed]

    def not_ok(self) -> list[CaseOutcome]:
        """Every case whose verdicts are not both ``OK``."""
        return [outcome for outcome in self.cases.values() if not outcome.ok]

    def slowest(self, n: int = 5) -> list[CaseOutcome]:
        """The ``n`` cases that took longest."""
        return sorted(self.cases.values(), key=lambda o: o.duration, reverse=True)[:n]

    def table(self) -> str:
        """A plain-text summary: counts per verdict, then each case that is not ``OK``."""
        counts = self.counts()
        lines = [
            f"agent {self.agent!r}: {len(self.cases)} cases"
            + (f" in {self.seconds:.1f}s" if self.seconds else "")
        ]
        lines += [f"  {behaviour:<14} {count:>4}" for behaviour, count in counts.items()]
        close_failures = sum(o.behavior_close not in _CLOSE_PASSES for o in self.cases.values())
        lines.append(f"  {'close failures':<14} {close_failures:>4}")
        not_ok = self.not_ok()
        if not_ok:
            lines += ["", f"  {'case':<9} {'behavior':<14} {'close':<17} {'code':>5} {'ms':>7}"]
            for o in not_ok:
                code = "-" if o.remote_close_code is None else str(o.remote_close_code)
                line = f"  {o.case:<9} {o.behavior:<14} {o.behavior_close:<17} {code:>5}"
                line += f" {o.duration:>7}"
                if o.failed:
                    line += f"  {o.result or o.result_close}"
                lines.append(line)
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        """The report as JSON-able data (for ``scripts/autobahn --json``)."""
        return {
            "agent": self.agent,
            "seconds": round(self.seconds, 3),
            "counts": self.counts(),
            "failed": [o.case for o in self.failures()],
            "cases": {case: dataclasses.asdict(o) for case, o in self.cases.items()},
        }


def kosoku_command() -> list[str]:
    """The kosoku console script of this interpreter's environment (else the one on PATH)."""
    beside = Path(sys.executable).with_name("kosoku")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("kosoku")
    if found is None:
        raise KosokuError("kosoku is not installed (pip install kosoku)")
    return [found]


def read_report(outdir: Path, *, details: bool = True) -> Report:
    """Parse the ``index.json`` kosoku wrote into ``outdir`` (exactly one agent expected).

    With ``details``, each failed case's ``result`` / ``resultClose`` prose is read from its own
    report file.
    """
    index_path = outdir / "index.json"
    try:
        index = json.loads(index_path.read_text("utf-8"))
    except FileNotFoundError:
        raise KosokuError(f"no report at {index_path}") from None
    if len(index) != 1:
        raise KosokuError(f"expected one agent in {index_path}, found {sorted(index)}")
    ((agent, entries),) = index.items()
    cases: dict[str, CaseOutcome] = {}
    for case in sorted(entries, key=case_sort_key):
        entry = entries[case]
        outcome = CaseOutcome(
            case=case,
            behavior=entry["behavior"],
            behavior_close=entry["behaviorClose"],
            remote_close_code=entry.get("remoteCloseCode"),
            duration=int(entry.get("duration") or 0),
        )
        if details and not outcome.ok and entry.get("reportfile"):
            try:
                detail = json.loads((outdir / entry["reportfile"]).read_text("utf-8"))
            except (OSError, ValueError):
                detail = {}
            outcome = dataclasses.replace(
                outcome,
                result=str(detail.get("result") or ""),
                result_close=str(detail.get("resultClose") or ""),
            )
        cases[case] = outcome
    return Report(agent=agent, cases=cases, outdir=outdir)


def run(
    url: str,
    outdir: Path,
    include: Iterable[str] = ALL_CASES,
    exclude: Iterable[str] = (),
    *,
    parallelism: int = 1,
    timeout: float | None = None,
) -> Report:
    """Run the ``include`` cases (ids or ``*`` globs) but not the ``exclude`` ones on ``url``.

    ``outdir`` is emptied first, then receives kosoku's reports.  kosoku exits 1 when a case
    fails: that is a verdict, read from the report, not an error.  Raises :class:`KosokuError`
    when no report was written, ``subprocess.TimeoutExpired`` after ``timeout`` seconds.
    """
    if outdir.exists():
        shutil.rmtree(outdir)
    command = [*kosoku_command(), url, "-p", str(parallelism), "-o", str(outdir)]
    for pattern in include:
        command += ["-i", pattern]
    for pattern in exclude:
        command += ["-x", pattern]
    started = time.monotonic()
    completed = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    seconds = time.monotonic() - started
    if completed.returncode not in (0, 1) or not (outdir / "index.json").exists():
        raise KosokuError(
            f"kosoku exited {completed.returncode} without a report:\n"
            f"{' '.join(command)}\n{completed.stdout[-2000:]}{completed.stderr[-4000:]}"
        )
    report = read_report(outdir)
    report.seconds = seconds
    return report


def case_ids(group: int, subgroups: Iterable[int], indexes: Iterable[int]) -> list[str]:
    """Explicit ids ``group.S.I`` for every subgroup ``S`` and index ``I`` given (12.x, 13.x)."""
    indexes = list(indexes)
    return [f"{group}.{s}.{i}" for s in subgroups for i in indexes]
