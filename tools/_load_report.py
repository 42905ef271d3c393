"""``accord load``: merging what every process measured into the report, and the live
view's figures. Histograms are added bucket by bucket (exact), never averaged."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hdrh.histogram import HdrHistogram

from accord.common.exits import ExitCode
from accord.tools._load import (
    HIST_DIGITS,
    LATE_S,
    SATURATED_PCT,
    SUCCESS_STATES,
    TIMELINE_DIGITS,
    LoadSettings,
    new_histogram,
)


def percentiles_ms(hist: HdrHistogram) -> dict[str, float]:
    if hist.get_total_count() == 0:
        return {k: 0.0 for k in ("min", "mean", "p50", "p90", "p99", "p99.9", "max")}
    out = {"min": hist.get_min_value() / 1000, "mean": hist.get_mean_value() / 1000}
    for label, p in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9)):
        out[label] = hist.get_value_at_percentile(p) / 1000
    out["max"] = hist.get_max_value() / 1000
    return {k: round(v, 3) for k, v in out.items()}


def merge_histograms(encoded: Sequence[str], digits: int = HIST_DIGITS) -> HdrHistogram:
    """Adds up encoded histograms (exactly: counts are added bucket by bucket)."""
    total = new_histogram(digits)
    for e in encoded:
        total.add(HdrHistogram.decode(e))
    return total


@dataclass(kw_only=True)
class Report:
    data: dict[str, Any]
    hist: HdrHistogram

    @property
    def succeeded(self) -> int:
        return sum(n for k, n in self.data["outcomes"].items() if k in SUCCESS_STATES)

    @property
    def exit_code(self) -> int:
        return ExitCode.OK if self.succeeded > 0 else ExitCode.FAILURE


def build_report(
    s: LoadSettings,
    results: Sequence[Mapping[str, Any]],
    *,
    started_unix: float,
    parent_cpu: tuple[float, float] | None = None,
) -> Report:
    """Merges every process's measurements into the report (``parent_cpu`` is the
    coordinating parent's (CPU s, wall s) when the workers ran in other processes)."""
    hist = merge_histograms([r["hist"] for r in results])
    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    samples: dict[str, str] = {}
    seconds: dict[int, list[Any]] = {}
    for r in results:
        outcomes.update(r["outcomes"])
        errors.update(r["errors"])
        for k, v in r["samples"].items():
            samples.setdefault(k, v)
        for sec, count, errs, enc in r["timeline"]:
            slot = seconds.setdefault(sec, [0, 0, []])
            slot[0] += count
            slot[1] += errs
            if enc is not None:
                slot[2].append(enc)
    total = outcomes.total() + errors.total()
    window = max((float(r["window_s"]) for r in results), default=0.0)
    succeeded = sum(n for k, n in outcomes.items() if k in SUCCESS_STATES)
    last = max(seconds, default=-1)
    if last >= 1 and window - last < 0.5:
        # A sliver of a last second (answers to what was in flight at the end) would show
        # as a spike of throughput: it joins the second before.
        count, errs, encs = seconds.pop(last)
        prev = seconds.setdefault(last - 1, [0, 0, []])
        prev[0] += count
        prev[1] += errs
        prev[2].extend(encs)
        last -= 1
    timeline = []
    for sec in range(last + 1):
        count, errs, encs = seconds.get(sec, [0, 0, []])
        h = merge_histograms(encs, TIMELINE_DIGITS)
        has = h.get_total_count() > 0
        # The last second may be partial (or a bit longer): throughput over its real span.
        span = max(1e-3, window - sec if sec == last else 1.0)
        timeline.append(
            {
                "t_s": sec,
                "tps": round(count / span, 1),
                "errors": errs,
                "p50_ms": round(h.get_value_at_percentile(50) / 1000, 3) if has else None,
                "p99_ms": round(h.get_value_at_percentile(99) / 1000, 3) if has else None,
            }
        )
    procs = [
        {
            "index": r["index"],
            "pid": r["pid"],
            "cpu_s": round(r["cpu_s"], 3),
            "wall_s": round(r["wall_s"], 3),
            "cpu_pct": round(100 * r["cpu_s"] / r["wall_s"], 1) if r["wall_s"] > 0 else 0.0,
        }
        for r in results
    ]
    busiest = max((p["cpu_pct"] for p in procs), default=0.0)
    warnings: list[str] = []
    if busiest > SATURATED_PCT:
        hint = "use more --processes" if (os.cpu_count() or 1) > len(procs) else "no idle core"
        warnings.append(
            f"the load generator was near CPU saturation ({busiest:.0f}% of a core in its"
            f" busiest process): it may be the bottleneck, not Accord ({hint})"
        )
    open_loop = None
    if s.rate is not None:
        late = sum(int(r["late"]) for r in results)
        dropped = sum(int(r["dropped"]) for r in results)
        open_loop = {
            "rate": s.rate,
            "scheduled": sum(int(r["scheduled"]) for r in results),
            "late": late,
            "late_threshold_ms": LATE_S * 1000,
            "dropped": dropped,
            "max_start_delay_ms": round(
                max((float(r["max_start_delay_s"]) for r in results), default=0.0) * 1000, 3
            ),
        }
        if late:
            warnings.append(
                f"{late:,} transactions started more than {LATE_S * 1000:g} ms after their"
                " intended time (every slot busy, or the generator behind); their latency"
                " includes the wait"
            )
        if dropped:
            warnings.append(
                f"{dropped:,} scheduled transactions never started before the end:"
                f" the rate of {s.rate:g}/s was not reached"
            )
    if total and not succeeded:
        warnings.append("no transaction succeeded")
    cpu = {
        "processes": procs,
        "busiest_cpu_pct": busiest,
        "saturated": busiest > SATURATED_PCT,
        "threshold_pct": SATURATED_PCT,
        "cpus": os.cpu_count(),
    }
    if parent_cpu is not None:
        used, wall = parent_cpu
        cpu["parent_cpu_pct"] = round(100 * used / wall, 1) if wall > 0 else 0.0
    data = {
        "settings": {**s.to_dict(), "loop": "open" if s.open_loop else "closed"},
        "started_unix": round(started_unix, 3),
        "duration_s": round(window, 3),
        "transactions": total,
        "succeeded": succeeded,
        "throughput_tps": round(total / window, 1) if window > 0 else 0.0,
        "success_tps": round(succeeded / window, 1) if window > 0 else 0.0,
        "latency_ms": percentiles_ms(hist),
        "outcomes": dict(sorted(outcomes.items())),
        "errors": dict(sorted(errors.items())),
        "samples": samples,
        "open_loop": open_loop,
        "timeline": timeline,
        "generator": cpu,
        "warnings": warnings,
        "histogram": hist.encode().decode(),
    }
    return Report(data=data, hist=hist)


def merge_progress(snapshots: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The live view's figures from the latest snapshot of every process."""
    hist = merge_histograms([s["hist"] for s in snapshots.values()])
    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for snap in snapshots.values():
        outcomes.update(snap["outcomes"])
        errors.update(snap["errors"])
    measured_s = max((float(s["measured_s"]) for s in snapshots.values()), default=0.0)
    count = sum(int(s["count"]) for s in snapshots.values())
    has = hist.get_total_count() > 0
    return {
        "measured_s": measured_s,
        "count": count,
        "tps": count / measured_s if measured_s > 0 else 0.0,
        "p50_ms": hist.get_value_at_percentile(50) / 1000 if has else None,
        "p99_ms": hist.get_value_at_percentile(99) / 1000 if has else None,
        "outcomes": dict(outcomes),
        "errors": dict(errors),
    }
