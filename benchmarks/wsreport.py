"""The figures of ``websocket.py``'s runs: medians over rounds, ratios over uvicorn + Channels,
issue 13's targets, and the printed table."""

from __future__ import annotations

import statistics
from typing import Any

BASELINE = "uvicorn"
SCENARIOS = ["echo", "fanout"]


def run_errors(r: dict[str, Any]) -> int:
    """Everything that makes a run's figures not comparable as they stand."""
    return int(
        r["error_count"]
        + r.get("mismatches", 0)
        + r.get("missing", 0)
        + r.get("duplicates", 0)
        + r.get("stray_messages", 0)
        + r.get("broadcast_timeouts", 0)
        + (0 if r["server_alive_at_end"] else 1)
    )


def cpu_us_per_message(r: dict[str, Any]) -> float:
    """The server's CPU time per echo round-trip or per fan-out delivery, in µs.

    Less sensitive than the rates to other processes on a shared machine: time they take from
    the server's core lowers its messages/s but not the CPU it spends on each.
    """
    count = r["messages"] if r["scenario"] == "echo" else r["deliveries"]
    return float(r["server_cpu_share"] * r["duration_s"] / count * 1e6) if count else 0.0


def summarize(runs: list[dict[str, Any]], order: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per scenario and server (in ``order``): medians over rounds, errors summed."""

    def median(rows: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] for r in rows))

    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for scenario in SCENARIOS:
        for server in sorted({r["server"] for r in runs}, key=order.index):
            mine = [r for r in runs if r["scenario"] == scenario and r["server"] == server]
            if not mine:
                continue
            row: dict[str, Any] = {
                "rounds": len(mine),
                "p50_ms": median(mine, "p50_us") / 1000,
                "p99_ms": median(mine, "p99_us") / 1000,
                "errors": sum(run_errors(r) for r in mine),
                "server_cpu_share": median(mine, "server_cpu_share"),
                "cpu_us_per_msg": statistics.median(cpu_us_per_message(r) for r in mine),
                "client_cpu_share": median(mine, "client_cpu_share"),
                "max_core_other_share": max(r["core_other_share"] for r in mine),
                "max_client_core_other_share": max(
                    r.get("client_core_other_share", 0.0) for r in mine
                ),
                "disturbed_rounds": sum(1 for r in mine if r["disturbed"]),
                "worker_rss_mib": median(mine, "worker_rss_kib") / 1024,
            }
            if scenario == "echo":
                row["msgs_per_s"] = median(mine, "msgs_per_s")
            else:
                row["all_delivered_p99_ms"] = median(mine, "all_delivered_p99_us") / 1000
                row["deliveries"] = sum(r["deliveries"] for r in mine)
                row["missing"] = sum(r["missing"] for r in mine)
                row["duplicates"] = sum(r["duplicates"] for r in mine)
            summary.setdefault(scenario, {})[server] = row
    return summary


def ratios(summary: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    """Each server over uvicorn + Channels: echo msgs/s (higher is better), fan-out p99 (lower
    is better)."""
    out: dict[str, dict[str, float | None]] = {}
    for scenario, by_server in summary.items():
        base = by_server.get(BASELINE)
        if base is None:
            continue
        key = "msgs_per_s" if scenario == "echo" else "p99_ms"
        out[scenario] = {
            name: (row[key] / base[key] if base[key] else None) for name, row in by_server.items()
        }
    return out


def targets(rat: dict[str, dict[str, float | None]]) -> dict[str, bool | None]:
    """Issue 13's targets: echo >= 2x uvicorn + Channels; fan-out p99 <= theirs."""
    echo = rat.get("echo", {}).get("ours")
    fanout = rat.get("fanout", {}).get("ours")
    return {
        "echo_ge_2x_uvicorn": None if echo is None else echo >= 2.0,
        "fanout_p99_le_uvicorn": None if fanout is None else fanout <= 1.0,
    }


def print_table(
    summary: dict[str, dict[str, dict[str, Any]]], rat: dict[str, dict[str, float | None]]
) -> None:
    header = (
        f"{'scenario':<8} {'server':<11} {'msgs/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'all p99':>8} {'missing':>7} {'dup':>4} {'errors':>6} {'srv cpu':>7} {'other':>6} "
        f"{'cli cpu':>7} {'cpu µs':>6} {'RSS MiB':>7} {'vs uvicorn':>10}"
    )
    print()
    print(header)
    print("-" * len(header))
    for scenario, by_server in summary.items():
        for name, s in by_server.items():
            ratio = rat.get(scenario, {}).get(name)
            ratio_text = "" if ratio is None else f"{ratio:.2f}x"
            rate = f"{s['msgs_per_s']:.0f}" if "msgs_per_s" in s else ""
            all_p99 = f"{s['all_delivered_p99_ms']:.2f}" if "all_delivered_p99_ms" in s else ""
            missing = str(s.get("missing", ""))
            dup = str(s.get("duplicates", ""))
            print(
                f"{scenario:<8} {name:<11} {rate:>8} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} "
                f"{all_p99:>8} {missing:>7} {dup:>4} {s['errors']:>6d} "
                f"{s['server_cpu_share']:>7.0%} {s['max_core_other_share']:>6.0%} "
                f"{s['client_cpu_share']:>7.0%} {s['cpu_us_per_msg']:>6.1f} "
                f"{s['worker_rss_mib']:>7.1f} {ratio_text:>10}"
            )
        print()
    print(
        "vs uvicorn: echo = msgs/s / uvicorn's (> 1: faster); fanout = p99 / uvicorn's "
        "(< 1: lower latency).  cpu µs = server CPU per round-trip or delivery.  all p99 = "
        "p99 over broadcasts of the time until the last socket had it.  errors = client errors "
        "+ echo mismatches + missing + duplicates + stray messages + broadcast timeouts, summed "
        "over rounds.  other = the highest share of the server's core used by other processes "
        "in any round (> 10%: figures understated)."
    )
