"""Interleaved rounds of windows, and the figures made of them (no processes here).

A *window* is one row driven at one concurrency: a warmup (load running, not measured),
then a measured duration (``bench/load.py``). Every row's processes stay up for the whole
run, so a *round* visits every row once at every concurrency: for each concurrency, every
row in the round's order. The order changes from round to round (forward, then reversed,
then rotated by a third and forward, reversed again ...), so two compared rows A and B run
A B | B A | A B ...: a slow drift of the machine hits both alike, and a ratio is taken
between the windows of one round. A window in which other processes used more than the
threshold of CPU (the run's own idle rows left out) is *disturbed*: it is run again (at most ``per_window`` times, and at
most ``budget`` re-runs in the whole run, so the run's length stays bounded); the last
attempt is kept, flagged if it was disturbed too.

The figures: per row and concurrency, the median throughput of the kept windows with
their min and max, and CPU per transaction by process pooled over them (CPU seconds
over all kept windows / transactions committed in them: the steadier figure); per
ratio, the median of the per-round ratios with min and max, and the coordinator's CPU
per transaction against the baseline's and against the bare pattern's.
"""

from __future__ import annotations

import statistics
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.ratios import Ratio

Window = dict[str, Any]

#: A window in which other processes used more than this (% of one core) is disturbed.
DISTURBED_PCT = 10.0


def base_order(names: Sequence[str], baselines: Mapping[str, str | None]) -> list[str]:
    """The rows in depth-first order of "compared with" (each row right after its
    baseline, then that row's own dependents), so compared rows run close in time;
    rows whose baseline is not run start a tree, in ``names`` order."""
    run = set(names)
    children: dict[str, list[str]] = {n: [] for n in names}
    roots = []
    for n in names:
        base = baselines.get(n)
        if base in run and base != n:
            children[base].append(n)
        else:
            roots.append(n)
    out: list[str] = []
    seen: set[str] = set()

    def visit(n: str) -> None:
        if n in seen:
            return
        seen.add(n)
        out.append(n)
        for c in children[n]:
            visit(c)

    for n in [*roots, *names]:  # names again: rows on a cycle of baselines
        visit(n)
    return out


def round_order(base: Sequence[str], k: int) -> list[str]:
    """Round ``k``'s order: even rounds forward, odd ones reversed; every second round
    rotated by a further third of the rows."""
    n = len(base)
    if n == 0:
        return []
    shift = ((k // 2) * max(1, n // 3)) % n
    order = [*base[shift:], *base[:shift]]
    return order if k % 2 == 0 else order[::-1]


def schedule(
    base: Sequence[str], concurrency: Sequence[int], rounds: int
) -> list[tuple[int, int, str]]:
    """``(round, concurrency, row)`` for every window, in the order they run: within a
    round the concurrencies in turn (reversed in odd rounds), every row at each."""
    out: list[tuple[int, int, str]] = []
    for k in range(rounds):
        conc = list(concurrency) if k % 2 == 0 else list(concurrency)[::-1]
        for c in conc:
            out.extend((k, c, name) for name in round_order(base, k))
    return out


@dataclass(kw_only=True)
class Reruns:
    """How many times a disturbed window is run again: ``per_window`` at most each, and
    ``budget`` in the whole run."""

    per_window: int
    budget: int
    threshold_pct: float = DISTURBED_PCT
    used: int = 0

    def disturbed(self, window: Mapping[str, Any]) -> bool:
        """Processes outside the run used more than the threshold: the run's own idle
        rows (``idle_rows_cpu_pct``, part of ``other_cpu_pct``) are the same for every
        window, so they do not count."""
        outside = float(window.get("other_cpu_pct", 0.0)) - float(
            window.get("idle_rows_cpu_pct", 0.0)
        )
        return outside > self.threshold_pct


async def measure_window(measure: Callable[[], Awaitable[Window]], reruns: Reruns) -> list[Window]:
    """Runs ``measure`` until a window is not disturbed or no re-run is left; returns every
    attempt (``attempt``, ``disturbed``, ``kept``: only the last one is kept)."""
    attempts: list[Window] = []
    while True:
        w = dict(await measure())
        w["attempt"] = len(attempts)
        w["disturbed"] = reruns.disturbed(w)
        w["kept"] = False
        attempts.append(w)
        if not w["disturbed"] or len(attempts) > reruns.per_window or reruns.used >= reruns.budget:
            w["kept"] = True
            return attempts
        reruns.used += 1


def cpu_seconds(w: Mapping[str, Any]) -> dict[str, float]:
    """CPU seconds of each process of a window (``client``, each server, ``kernel``),
    from its ``*_cpu_pct`` (% of one core over ``duration_s``)."""
    d = float(w["duration_s"]) / 100
    out = {"client": float(w.get("client_cpu_pct", 0.0)) * d}
    for name, pct in w.get("server_cpu_pct", {}).items():
        out[name] = float(pct) * d
    out["kernel"] = float(w.get("kernel_cpu_pct", 0.0)) * d
    return out


def cpu_us_per_txn(windows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """µs of CPU per committed transaction by process, pooled over ``windows``."""
    txns = sum(int(w["transactions"]) for w in windows)
    total: dict[str, float] = {}
    for w in windows:
        for name, s in cpu_seconds(w).items():
            total[name] = total.get(name, 0.0) + s
    if txns <= 0:
        return dict.fromkeys(total, 0.0)
    return {name: round(s * 1e6 / txns, 1) for name, s in total.items()}


def coordinator_us(per_process: Mapping[str, float]) -> float:
    """The coordinator's CPU per transaction: every ``coordinator*`` process (the sharded
    rows have two)."""
    return sum(v for k, v in per_process.items() if k.startswith("coordinator"))


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def summarize(windows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One result per (row, concurrency), from its kept windows, in first-run order:
    ``tps`` the median (``tps_min``/``tps_max``), latency the median of the windows'
    percentiles (``max_ms`` the largest), counts summed, CPU pooled (% of one core over
    the windows' total duration, and ``cpu_us_per_txn`` by process)."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for w in windows:
        if w.get("kept", True):
            groups.setdefault((str(w["name"]), int(w["concurrency"])), []).append(w)
    out = []
    for (name, c), ws in groups.items():
        secs = sum(float(w["duration_s"]) for w in ws)
        pooled: dict[str, float] = {}
        for w in ws:
            for k, s in cpu_seconds(w).items():
                pooled[k] = pooled.get(k, 0.0) + s
        pct = {k: round(s / secs * 100, 1) if secs > 0 else 0.0 for k, s in pooled.items()}
        other = sum(float(w.get("other_cpu_pct", 0.0)) * float(w["duration_s"]) for w in ws)
        idle = sum(float(w.get("idle_rows_cpu_pct", 0.0)) * float(w["duration_s"]) for w in ws)
        tps = [float(w["tps"]) for w in ws]
        out.append(
            {
                "name": name,
                "concurrency": c,
                "tps": round(_median(tps), 1),
                "tps_min": min(tps),
                "tps_max": max(tps),
                "rounds": len(ws),
                "p50_ms": round(_median([float(w["p50_ms"]) for w in ws]), 3),
                "p99_ms": round(_median([float(w["p99_ms"]) for w in ws]), 3),
                "max_ms": max(float(w.get("max_ms", 0.0)) for w in ws),
                "transactions": sum(int(w["transactions"]) for w in ws),
                "errors": sum(int(w["errors"]) for w in ws),
                "duration_s": round(secs, 3),
                "client_cpu_pct": pct.pop("client"),
                "kernel_cpu_pct": pct.pop("kernel"),
                "server_cpu_pct": pct,
                "other_cpu_pct": round(other / secs, 1) if secs > 0 else 0.0,
                "idle_rows_cpu_pct": round(idle / secs, 1) if secs > 0 else 0.0,
                "disturbed_windows": sum(1 for w in ws if w.get("disturbed")),
                "cpu_us_per_txn": cpu_us_per_txn(ws),
            }
        )
    return out


def ratio_summaries(
    windows: Sequence[Mapping[str, Any]],
    pairs: Sequence[Ratio],
    bare: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Per ratio and concurrency both rows have: the ratio of each round (the kept
    windows of the two rows in that round), their median, min and max, and the
    coordinator's CPU per transaction (pooled) against the baseline's and against the
    bare pattern's (``bare``: row -> its bare pattern; left out when that is the baseline
    itself or did not run)."""
    kept: dict[tuple[str, int, int], Mapping[str, Any]] = {}
    by_row: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    concurrencies: list[int] = []
    for w in windows:
        if not w.get("kept", True):
            continue
        key = (str(w["name"]), int(w["concurrency"]))
        kept[(*key, int(w.get("round", 0)))] = w
        by_row.setdefault(key, []).append(w)
        if key[1] not in concurrencies:
            concurrencies.append(key[1])
    coord = {key: coordinator_us(cpu_us_per_txn(ws)) for key, ws in by_row.items()}
    out = []
    for q in pairs:
        for c in concurrencies:
            rounds = sorted(
                k for (n, cc, k) in kept if n == q.row and cc == c and (q.baseline, c, k) in kept
            )
            values = [
                float(kept[(q.row, c, k)]["tps"]) / float(kept[(q.baseline, c, k)]["tps"])
                for k in rounds
                if float(kept[(q.baseline, c, k)]["tps"]) > 0
            ]
            if not values:
                continue
            row_us, base_us = coord.get((q.row, c), 0.0), coord.get((q.baseline, c), 0.0)
            entry: dict[str, Any] = {
                "name": q.name,
                "concurrency": c,
                "median": round(_median(values), 3),
                "min": round(min(values), 3),
                "max": round(max(values), 3),
                "rounds": len(values),
                "values": [round(v, 3) for v in values],
                "disturbed_rounds": sum(
                    1
                    for k in rounds
                    if kept[(q.row, c, k)].get("disturbed")
                    or kept[(q.baseline, c, k)].get("disturbed")
                ),
                "target": q.target,
                "headline": q.headline,
                "coordinator_cpu_us": round(row_us, 1),
                "baseline_coordinator_cpu_us": round(base_us, 1),
                "coordinator_cpu_ratio": round(row_us / base_us, 3) if base_us > 0 else None,
            }
            b = (bare or {}).get(q.row, q.baseline)
            bare_us = coord.get((b, c), 0.0)
            if b not in (q.row, q.baseline) and bare_us > 0:
                entry["bare"] = b
                entry["bare_coordinator_cpu_us"] = round(bare_us, 1)
                entry["coordinator_cpu_vs_bare"] = round(row_us / bare_us, 3)
            out.append(entry)
    return out
