"""``accord load --plot FILE.png``: latency over time and the latency distribution.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global
backend switch), so it works on a headless machine and inside a running program.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator


def _distribution(hist: HdrHistogram) -> tuple[list[float], list[float]]:
    """(1 / (1 - q), latency in ms) at percentiles spread evenly on that log scale, up
    to what the sample supports."""
    n = hist.get_total_count()
    if n == 0:
        return [], []
    nines = max(1.0, min(5.0, math.log10(n)))
    xs, ys = [], []
    steps = 200
    for i in range(steps + 1):
        x = nines * i / steps
        q = 1 - 10**-x
        xs.append(10**x)
        ys.append(hist.get_value_at_percentile(q * 100) / 1000)
    # The slowest one, at the percentile it stands for (1 - 1/n).
    xs.append(max(xs[-1], float(n)))
    ys.append(hist.get_max_value() / 1000)
    return xs, ys


def plot_report(report: Mapping[str, Any], hist: HdrHistogram, path: Path) -> None:
    """Writes the two-panel PNG for ``report`` (the JSON dict) and its merged histogram."""
    fig = Figure(figsize=(12, 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    over_time, dist = fig.subplots(1, 2, width_ratios=(1.4, 1))
    s = report["settings"]
    loop = f"open loop {s['rate']:g}/s" if s["rate"] is not None else "closed loop"
    fig.suptitle(
        f"accord load: {s['mode']}, {loop}, concurrency {s['concurrency']},"
        f" {report['throughput_tps']:,.0f} tx/s, p99 {report['latency_ms']['p99']:,.1f} ms"
    )

    timeline = report["timeline"]
    t = [p["t_s"] + 0.5 for p in timeline]
    rate = over_time.twinx()
    rate.bar(t, [p["tps"] for p in timeline], width=0.9, color="0.85", label="tx/s")
    rate.set_ylabel("throughput (tx/s)", color="0.45")
    rate.tick_params(axis="y", colors="0.45")
    over_time.set_zorder(rate.get_zorder() + 1)
    over_time.patch.set_visible(False)
    for key, label, color in (("p50_ms", "p50", "tab:blue"), ("p99_ms", "p99", "tab:red")):
        pts = [(x, p[key]) for x, p in zip(t, timeline, strict=True) if p[key] is not None]
        over_time.plot(
            [x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, color=color, label=label
        )
    over_time.set_xlabel("time (s, measured part)")
    over_time.set_ylabel("latency (ms)")
    over_time.set_ylim(bottom=0)
    over_time.set_title("latency over time (per second)")
    over_time.grid(True, alpha=0.3)
    handles = over_time.get_legend_handles_labels()[0] + rate.get_legend_handles_labels()[0]
    over_time.legend(handles=handles, loc="upper left")

    xs, ys = _distribution(hist)
    dist.plot(xs, ys, color="tab:purple")
    dist.set_xscale("log")
    labels = {2: "50%", 10: "90%", 100: "99%", 1000: "99.9%", 10_000: "99.99%"}
    labels[100_000] = "99.999%"
    right = xs[-1] * 1.25 if xs else 10
    dist.set_xlim(1, right)
    dist.xaxis.set_major_locator(FixedLocator([x for x in labels if x <= right]))
    dist.xaxis.set_minor_locator(NullLocator())
    dist.xaxis.set_major_formatter(FuncFormatter(lambda x, _: labels.get(round(x), "")))
    dist.set_xlabel("percentile")
    dist.set_ylabel("latency (ms)")
    dist.set_ylim(bottom=0)
    dist.set_title(f"latency distribution ({hist.get_total_count():,} transactions)")
    dist.grid(True, which="major", alpha=0.3)
    fig.savefig(path)
