"""The benchmark report: ``bench/results.json``, the table printed at the end, and the
README's tables (``python -m bench.report bench/results.json --markdown``).

JSON shape (DESIGN "Benchmarks")::

    {"machine": {...}, "command": "...", "settings": {...},
     "results": [{"name", "concurrency", "tps", "p50_ms", "p99_ms", "transactions",
                  "errors", "duration_s", "max_ms", "client_cpu_pct",
                  "server_cpu_pct": {process: pct}, "kernel_cpu_pct", "other_cpu_pct",
                  "tps_min", "tps_max", "rounds", "disturbed_windows",
                  "cpu_us_per_txn": {"client"|process|"kernel": µs}}, ...],
     "ratios": [{"name": "2pc/baseline-2pc", "concurrency", "median", "min", "max",
                 "rounds", "values", "disturbed_rounds", "target", "headline",
                 "coordinator_cpu_us", "baseline_coordinator_cpu_us",
                 "coordinator_cpu_ratio", ["bare", "bare_coordinator_cpu_us",
                 "coordinator_cpu_vs_bare"]}, ...],
     "skipped_ratios": [{"name", "note"}],
     "windows": [{...a result's keys for one window..., "idle_rows_cpu_pct",
                  "cpu_us_per_txn", "round", "attempt", "disturbed", "kept",
                  "ended_at_s"}, ...],
     "reruns": {"used", "budget", "per_window"},
     "failures": [{"name", "error"}], "warnings": [{"name", "warning"}]}

``results[]`` has one entry per row and concurrency, made of its kept windows
(``bench/rounds.py``: median throughput, CPU pooled); ``windows[]`` has every window
run, re-runs of disturbed ones included. CPU figures are in % of one core over the
measured windows (200 = both cores of a 2-core machine): the load generator (this
process), each server process, kernel threads (``kernel_cpu_pct``: the journal and
writeback work of fsyncs, mostly) and ``other_cpu_pct``, every other process on the
machine (the other rows' idle processes included). A ratio is only computed between
windows of the same round of the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.load import LoadResult
from bench.ratios import Ratio, Skipped
from bench.rounds import coordinator_us, ratio_summaries, summarize

#: The markdown's range dash and times sign.
D, X = "\u2013", "\u00d7"

#: Keys every result row carries (the contract); more may follow.
RESULT_KEYS = (
    "name",
    "concurrency",
    "tps",
    "p50_ms",
    "p99_ms",
    "transactions",
    "errors",
    "duration_s",
)
#: Keys every ratio carries (the contract); more may follow.
RATIO_KEYS = ("name", "concurrency", "median", "min", "max", "rounds")


def result_row(name: str, load: LoadResult) -> dict[str, Any]:
    """One window's figures."""
    return {
        "name": name,
        "concurrency": load.concurrency,
        "tps": load.tps,
        "p50_ms": load.p50_ms,
        "p99_ms": load.p99_ms,
        "transactions": load.transactions,
        "errors": load.errors,
        "duration_s": load.duration_s,
        "max_ms": load.max_ms,
        "client_cpu_pct": load.client_cpu_pct,
        "server_cpu_pct": dict(load.server_cpu_pct),
        "kernel_cpu_pct": load.kernel_cpu_pct,
        "other_cpu_pct": load.other_cpu_pct,
        "idle_rows_cpu_pct": load.idle_rows_cpu_pct,
    }


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "grpcio": _version("grpcio"),
        "protobuf": _version("protobuf"),
        "uvloop": _version("uvloop"),
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _in_table_order(results: list[dict[str, Any]], rows: Sequence[str]) -> list[dict[str, Any]]:
    """The rows' table order (the run's order is the rounds'), then concurrency."""
    pos = {name: i for i, name in enumerate(rows)}
    return sorted(results, key=lambda r: (pos.get(r["name"], len(pos)), r["concurrency"]))


def build_report(
    *,
    command: str,
    settings: Mapping[str, Any],
    windows: Sequence[Mapping[str, Any]],
    pairs: Sequence[Ratio],
    skipped: Sequence[Skipped] = (),
    bare: Mapping[str, str] | None = None,
    reruns: Mapping[str, int] | None = None,
    failures: Sequence[Mapping[str, str]] = (),
    warnings: Sequence[Mapping[str, str]] = (),
    machine: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "machine": dict(machine if machine is not None else machine_info()),
        "command": command,
        "settings": dict(settings),
        "results": _in_table_order(summarize(windows), settings.get("rows", [])),
        "ratios": ratio_summaries(windows, pairs, bare),
        "skipped_ratios": [{"name": s.name, "note": s.note} for s in skipped],
        "windows": [dict(w) for w in windows],
        "reruns": dict(reruns or {}),
        "failures": [dict(f) for f in failures],
        "warnings": [dict(w) for w in warnings],
    }


def write_report(path: Path, report: Mapping[str, Any]) -> None:
    """Writes atomically (temp file, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def _range(q: Mapping[str, Any]) -> str:
    return f"{q['median']:.2f} [{q['min']:.2f}{D}{q['max']:.2f}]"


def render(console: Console, report: Mapping[str, Any]) -> None:
    m = report["machine"]
    table = Table(
        title=f"Accord benchmarks: {m['cpu']}, {m['cores']} cores, Python {m['python']}, "
        f"grpcio {m['grpcio']}",
        caption="tx/s: median of the rounds \\[min-max]. CPU in % of one core over the "
        "measured windows: gen = load generator, servers = each server process, "
        "kernel = kernel threads, other = every other process",
    )
    for col in ("row", "conc", "tx/s", "p50 ms", "p99 ms", "txns", "errors", "rnds", "gen"):
        table.add_column(col, justify="left" if col == "row" else "right", no_wrap=True)
    table.add_column("servers", no_wrap=True)
    table.add_column("kernel", justify="right", no_wrap=True)
    table.add_column("other", justify="right", no_wrap=True)
    for r in report["results"]:
        servers = " ".join(f"{k}={v:.0f}" for k, v in r.get("server_cpu_pct", {}).items())
        tps = f"{r['tps']:.1f}"
        if "tps_min" in r:
            tps += f" [{r['tps_min']:.0f}-{r['tps_max']:.0f}]"
        table.add_row(
            r["name"],
            str(r["concurrency"]),
            tps,
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            str(r["transactions"]),
            str(r["errors"]) if not r["errors"] else f"[red]{r['errors']}[/red]",
            str(r.get("rounds", 1)),
            f"{r.get('client_cpu_pct', 0.0):.0f}",
            servers,
            f"{r.get('kernel_cpu_pct', 0.0):.0f}",
            f"{r.get('other_cpu_pct', 0.0):.0f}",
        )
    console.print(table)
    for line in headline(report):
        console.print(line.replace("**", "").replace("`", ""), highlight=False)
    for q in report["ratios"]:
        target = f" (target {q['target']})" if q.get("target") is not None else ""
        cpu = ""
        if q.get("coordinator_cpu_ratio") is not None:
            cpu = (
                f"; coordinator {q['coordinator_cpu_us']:.0f} µs/txn against "
                f"{q['baseline_coordinator_cpu_us']:.0f}"
            )
        flag = (
            f" [yellow]{q['disturbed_rounds']} disturbed[/yellow]"
            if q.get("disturbed_rounds")
            else ""
        )
        console.print(
            f"ratio {q['name']} at {q['concurrency']}: [bold]{_range(q)}[/bold] over "
            f"{q['rounds']} rounds{target}{cpu}{flag}",
            highlight=False,
        )
    for s in report.get("skipped_ratios", []):
        if "not defined" in s["note"]:
            console.print(f"[dim]ratio {s['name']} skipped: {s['note']}[/dim]", highlight=False)
    reruns = report.get("reruns") or {}
    if reruns:
        console.print(
            f"disturbed windows re-run: {reruns.get('used', 0)} (budget {reruns.get('budget')})"
        )
    for w in report["warnings"]:
        console.print(f"[yellow]warning[/yellow] {w['name']}: {w['warning']}", highlight=False)
    for f in report["failures"]:
        console.print(f"[red]FAILED[/red] {f['name']}: {f['error']}", highlight=False)


# --------------------------------------------------------------------- markdown


def _top(report: Mapping[str, Any]) -> int:
    return max((int(r["concurrency"]) for r in report["results"]), default=0)


def headline(report: Mapping[str, Any]) -> list[str]:
    """One sentence per headline ratio at the top concurrency: the throughput ratio
    (median [min-max]) and the coordinator's CPU per transaction against the bare
    pattern's coordinator."""
    top = _top(report)
    out = []
    for q in report["ratios"]:
        if not q.get("headline") or int(q["concurrency"]) != top:
            continue
        row, base = q["name"].split("/", 1)
        line = (
            f"- `{row}` / `{base}` at {top} in flight: **{q['median']:.2f}{X}** the throughput "
            f"(median of {q['rounds']} rounds, {q['min']:.2f}{D}{q['max']:.2f})"
        )
        if q.get("target") is not None:
            line += f", target {q['target']}"
        bare = q.get("bare", base)
        bare_us = q.get("bare_coordinator_cpu_us", q.get("baseline_coordinator_cpu_us"))
        if bare_us:
            line += (
                f"; the coordinator uses {q['coordinator_cpu_us']:.0f} µs of CPU per "
                f"transaction against {bare_us:.0f} µs for `{bare}`'s "
                f"({q['coordinator_cpu_us'] / bare_us:.2f}{X})"
            )
        out.append(line + ".")
    return out


def _ratio_table(report: Mapping[str, Any]) -> list[str]:
    conc = sorted({int(q["concurrency"]) for q in report["ratios"]})
    top = _top(report)
    names: list[str] = []
    for q in report["ratios"]:
        if q["name"] not in names:
            names.append(q["name"])
    by = {(q["name"], int(q["concurrency"])): q for q in report["ratios"]}
    head = ["ratio", *(f"at {c}: median [min{D}max]" for c in conc), "rounds", "target"]
    head.append(f"coordinator CPU µs/txn at {top}: row / baseline")
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name in names:
        row, base = name.split("/", 1)
        cells = [f"`{row}` / `{base}`"]
        for c in conc:
            q = by.get((name, c))
            cells.append(_range(q) if q else D)
        any_q = next(by[(name, c)] for c in conc if (name, c) in by)
        cells.append(str(any_q["rounds"]))
        cells.append("" if any_q.get("target") is None else str(any_q["target"]))
        tq = by.get((name, top))
        if tq and tq.get("coordinator_cpu_ratio") is not None:
            cells.append(
                f"{tq['coordinator_cpu_us']:.0f} / {tq['baseline_coordinator_cpu_us']:.0f} "
                f"({tq['coordinator_cpu_ratio']:.2f}{X})"
            )
        else:
            cells.append(D)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _throughput_table(report: Mapping[str, Any]) -> list[str]:
    conc = sorted({int(r["concurrency"]) for r in report["results"]})
    names: list[str] = []
    for r in report["results"]:
        if r["name"] not in names:
            names.append(r["name"])
    by = {(r["name"], int(r["concurrency"])): r for r in report["results"]}
    head = ["row"]
    for c in conc:
        head += [f"tx/s at {c}: median [min{D}max]", f"p50 / p99 ms at {c}"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name in names:
        cells = [f"`{name}`"]
        for c in conc:
            r = by.get((name, c))
            if r is None:
                cells += [D, D]
                continue
            cells.append(
                f"{r['tps']:.0f} [{r.get('tps_min', r['tps']):.0f}{D}{r.get('tps_max', r['tps']):.0f}]"
            )
            cells.append(f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _cpu_columns(per: Mapping[str, float]) -> dict[str, float]:
    """A row's µs per transaction in the CPU table's columns."""
    out = {"load generator": per.get("client", 0.0), "coordinator": coordinator_us(per)}
    for name, us in per.items():
        if name in ("client", "kernel") or name.startswith("coordinator"):
            continue
        col = name if name.startswith("bank") else "other servers"
        out[col] = out.get(col, 0.0) + us
    out["kernel"] = per.get("kernel", 0.0)
    return out


def _cpu_table(report: Mapping[str, Any]) -> list[str]:
    top = _top(report)
    rows = [r for r in report["results"] if int(r["concurrency"]) == top]
    cols: list[str] = ["load generator", "coordinator"]
    per_row = []
    for r in rows:
        c = _cpu_columns(r.get("cpu_us_per_txn", {}))
        per_row.append(c)
        for k in c:
            if k not in cols and k not in ("other servers", "kernel"):
                cols.append(k)
    cols = [*cols[:2], *sorted(cols[2:]), "other servers", "kernel"]
    head = ["row", *cols, "total"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r, c in zip(rows, per_row, strict=True):
        cells = [f"`{r['name']}`", *(f"{c[k]:.0f}" if k in c else D for k in cols)]
        cells.append(f"{sum(c.values()):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _idle(report: Mapping[str, Any]) -> str:
    idle = [float(w.get("idle_rows_cpu_pct", 0.0)) for w in report.get("windows", [])]
    out = ""
    if idle:
        out += (
            f"; the other rows' idle processes used {statistics.median(idle):.0f} % of a "
            "core (median) during each window"
        )
    elapsed = report.get("settings", {}).get("elapsed_s")
    if elapsed:
        out += f"; the run took {float(elapsed) / 60:.1f} minutes"
    return out


def markdown(report: Mapping[str, Any]) -> str:
    """The README performance section's figures, in markdown, from one run."""
    m = report["machine"]
    s = report.get("settings", {})
    top = _top(report)
    reruns = report.get("reruns") or {}
    kept_disturbed = sum(int(r.get("disturbed_windows", 0)) for r in report["results"])
    out = []
    if s.get("quick"):
        out += ["> **Quick run (`BENCH_QUICK=1`): not figures to quote.**", ""]
    out += [
        f"Measured with `{report.get('command', 'make bench')}` on {m.get('cpu')}, "
        f"{m.get('cores')} cores, Python {m.get('python')}, grpcio {m.get('grpcio')}, "
        f"protobuf {m.get('protobuf')}, uvloop {m.get('uvloop')}, "
        f"{str(m.get('date', ''))[:10]}: {s.get('rounds', '?')} rounds, each row's "
        f"window {s.get('warmup_s', '?')} s of warm-up then {s.get('duration_s', '?')} s "
        f"measured, at {', '.join(str(c) for c in s.get('concurrency', []))} in flight; "
        f"{reruns.get('used', 0)} disturbed windows run again, {kept_disturbed} kept "
        f"disturbed{_idle(report)}.",
        "",
        *headline(report),
        "",
        f"Ratios of throughput, median over the rounds [min{D}max]:",
        "",
        *_ratio_table(report),
        "",
        f"CPU per committed transaction by process at {top} in flight, in µs "
        "(pooled over the rounds):",
        "",
        *_cpu_table(report),
        "",
        "Throughput and latency by row:",
        "",
        *_throughput_table(report),
    ]
    failed = [
        f"(row `{f['name']}` failed: {f['error'].splitlines()[0]})" for f in report["failures"]
    ]
    if failed:
        out += ["", *failed]
    skipped = [q for q in report.get("skipped_ratios", []) if "not defined" in q["note"]]
    if skipped:
        out += ["", *(f"(ratio `{q['name']}` skipped: {q['note']})" for q in skipped)]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report", description="Print a results.json again."
    )
    parser.add_argument("report", type=Path, nargs="?", default=Path("bench/results.json"))
    parser.add_argument(
        "--markdown", action="store_true", help="the README's tables (paste them there)"
    )
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    if args.markdown:
        sys.stdout.write(markdown(report))
    else:
        render(Console(width=None if sys.stdout.isatty() else 150), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
