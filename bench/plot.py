"""``python -m bench.plot bench/results.json bench/results.png``: the README's figure.

Top left: throughput of every row at the highest concurrency of the run (the median of
the rounds, the whisker their min and max). Top right: where the CPU went, in
milliseconds of CPU per transaction, stacked by process (load generator, coordinators,
participants, the rest). On a saturated machine the second panel is the first one's
explanation: throughput is cores divided by the height of the stack. Bottom: every
ratio at that concurrency, the median of the rounds with its min-max range, and its
target where it has one.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: Stack order and colours of the CPU panel.
_GROUPS = (
    ("load generator", "tab:gray"),
    ("coordinator", "tab:blue"),
    ("participants", "tab:orange"),
    ("PostgreSQL", "tab:purple"),
    ("etcd / sink / kernel", "tab:green"),
)


def _group(process: str) -> str:
    if process.startswith("coordinator"):
        return "coordinator"
    if process.startswith(("bank", "flight", "hotel", "car")):
        return "participants"
    if process.startswith("postgres"):
        return "PostgreSQL"
    return "etcd / sink / kernel"


def cpu_ms_per_txn(result: Mapping[str, Any]) -> dict[str, float]:
    """CPU per committed transaction in ms, by group (``*_cpu_pct`` are % of one core)."""
    tps = float(result["tps"])
    # The PostgreSQL group only for rows that run a PostgreSQL server.
    servers = result.get("server_cpu_pct", {})
    pg = any(_group(name) == "PostgreSQL" for name in servers)
    out = dict.fromkeys((g for g, _ in _GROUPS if pg or g != "PostgreSQL"), 0.0)
    if tps <= 0:
        return out
    out["load generator"] = float(result.get("client_cpu_pct", 0.0)) * 10 / tps
    for name, pct in servers.items():
        out[_group(name)] += float(pct) * 10 / tps
    out["etcd / sink / kernel"] += float(result.get("kernel_cpu_pct", 0.0)) * 10 / tps
    return out


def top_results(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Each row's result at the run's highest concurrency, in the run's order."""
    results: Sequence[Mapping[str, Any]] = report["results"]
    if not results:
        return []
    top = max(int(r["concurrency"]) for r in results)
    return [r for r in results if int(r["concurrency"]) == top]


def plot(report: Mapping[str, Any], path: Path) -> None:
    rows = top_results(report)
    if not rows:
        raise ValueError("the report has no results to plot")
    top = int(rows[0]["concurrency"])
    qs = [q for q in report.get("ratios", []) if int(q["concurrency"]) == top]
    names = [str(r["name"]) for r in rows]
    ys = list(range(len(rows)))[::-1]

    fig = Figure(figsize=(12, 0.45 * (len(rows) + len(qs)) + 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplot_mosaic(
        [["tput", "cpu"], ["ratio", "ratio"]],
        height_ratios=[max(1, len(rows)), max(1, len(qs))],
        gridspec_kw={"hspace": 0.08},
    )
    tput, cpu, rat = axes["tput"], axes["cpu"], axes["ratio"]
    cpu.sharey(tput)

    tps = [float(r["tps"]) for r in rows]
    lo = [t - float(r.get("tps_min", t)) for t, r in zip(tps, rows, strict=True)]
    hi = [float(r.get("tps_max", t)) - t for t, r in zip(tps, rows, strict=True)]
    colours = ["tab:gray" if n.startswith("baseline") else "tab:blue" for n in names]
    tput.barh(ys, tps, color=colours, xerr=[lo, hi], error_kw={"elinewidth": 1, "capsize": 2})
    for y, t, h in zip(ys, tps, hi, strict=True):
        tput.text(t + h, y, f" {t:.0f}", va="center", fontsize=8)
    tput.set_yticks(ys, names)
    rounds = max((int(r.get("rounds", 1)) for r in rows), default=1)
    tput.set_xlabel(
        f"transactions/s at {top} in flight (closed loop; median of {rounds} rounds, min-max)"
    )
    tput.set_xlim(0, max(t + h for t, h in zip(tps, hi, strict=True)) * 1.25)
    tput.grid(axis="x", alpha=0.3)

    left = [0.0] * len(rows)
    per_row = [cpu_ms_per_txn(r) for r in rows]
    for group, colour in _GROUPS:
        widths = [c.get(group, 0.0) for c in per_row]
        cpu.barh(ys, widths, left=left, color=colour, label=group)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for y, total in zip(ys, left, strict=True):
        cpu.text(total, y, f" {total:.2f}", va="center", fontsize=8)
    cpu.set_xlabel("CPU ms per transaction, all processes")
    cpu.set_xlim(0, max(left) * 1.2)
    cpu.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    cpu.grid(axis="x", alpha=0.3)
    cpu.tick_params(labelleft=False)

    plot_ratios(rat, qs, top)

    m = report.get("machine", {})
    quick = " (quick run)" if report.get("settings", {}).get("quick") else ""
    fig.suptitle(
        f"make bench{quick}, {m.get('date', '')[:10]}: {m.get('cpu', '?')}, "
        f"{m.get('cores', '?')} cores, Python {m.get('python', '?')}, "
        f"grpcio {m.get('grpcio', '?')}",
        fontsize=10,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def plot_ratios(ax: Any, qs: Sequence[Mapping[str, Any]], top: int) -> None:
    """Each ratio's median (dot) and min-max range (bar), its target (red tick)."""
    if not qs:
        ax.text(0.5, 0.5, "no ratios in this run", ha="center", va="center")
        ax.set_axis_off()
        return
    ys = list(range(len(qs)))[::-1]
    med = [float(q["median"]) for q in qs]
    lo = [m - float(q["min"]) for m, q in zip(med, qs, strict=True)]
    hi = [float(q["max"]) - m for m, q in zip(med, qs, strict=True)]
    ax.errorbar(med, ys, xerr=[lo, hi], fmt="o", color="tab:blue", capsize=3, markersize=4)
    for y, m, h, q in zip(ys, med, hi, qs, strict=True):
        label = f" {m:.2f} [{q['min']:.2f}-{q['max']:.2f}]"
        if q.get("target") is not None:
            label += f", target {q['target']}"
            ax.plot([q["target"]], [y], marker="|", color="tab:red", markersize=12)
        ax.text(m + h, y, label, va="center", fontsize=8)
    ax.axvline(1.0, color="gray", linewidth=0.8, alpha=0.6)
    ax.set_yticks(ys, [str(q["name"]) for q in qs])
    right = max(
        [m + h for m, h in zip(med, hi, strict=True)] + [float(q.get("target") or 0) for q in qs]
    )
    ax.set_xlim(0, right * 1.35)
    ax.set_xlabel(
        f"ratio of throughput at {top} in flight: median of the rounds, min-max; red: the target"
    )
    ax.grid(axis="x", alpha=0.3)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__)
    parser.add_argument("report", type=Path, nargs="?", default=Path("bench/results.json"))
    parser.add_argument("out", type=Path, nargs="?", default=Path("bench/results.png"))
    args = parser.parse_args(argv)
    plot(json.loads(args.report.read_text()), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
