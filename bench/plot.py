"""``python -m bench.plot bench/results.json bench/results.png``: the README's figure.

Left: throughput of every row at the highest concurrency of the run, each bar labelled
with its ratio to its baseline (the ratio the targets are about). Right: where the CPU
went, in milliseconds of CPU per transaction, stacked by process (load generator,
coordinators, participants, the rest). On a saturated machine the second panel is the
first one's explanation: throughput is cores divided by the height of the stack.

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
    ratio = {
        q["name"].split("/", 1)[0]: (q["name"].split("/", 1)[1], float(q["ratio"]))
        for q in report.get("ratios", [])
        if int(q["concurrency"]) == top
    }
    names = [str(r["name"]) for r in rows]
    ys = list(range(len(rows)))[::-1]

    fig = Figure(figsize=(12, 0.45 * len(rows) + 1.8), layout="constrained")
    FigureCanvasAgg(fig)
    tput, cpu = fig.subplots(1, 2, sharey=True)

    tps = [float(r["tps"]) for r in rows]
    colours = ["tab:gray" if n.startswith("baseline") else "tab:blue" for n in names]
    tput.barh(ys, tps, color=colours)
    for y, n, t in zip(ys, names, tps, strict=True):
        label = f"{t:.0f}"
        if n in ratio:
            base, q = ratio[n]
            label += f"  ({q:.2f} of {base})"
        tput.text(t, y, " " + label, va="center", fontsize=8)
    tput.set_yticks(ys, names)
    tput.set_xlabel(f"transactions/s at {top} in flight (closed loop)")
    tput.set_xlim(0, max(tps) * 1.45)
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
    cpu.legend(loc="lower right", fontsize=8)
    cpu.grid(axis="x", alpha=0.3)

    m = report.get("machine", {})
    fig.suptitle(
        f"make bench, {m.get('date', '')[:10]}: {m.get('cpu', '?')}, {m.get('cores', '?')} "
        f"cores, Python {m.get('python', '?')}, grpcio {m.get('grpcio', '?')}",
        fontsize=10,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


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
