"""The benchmark report: ``bench/results.json`` and the table printed at the end.

JSON shape (DESIGN "Benchmarks")::

    {"machine": {...}, "command": "...", "settings": {...},
     "results": [{"name", "concurrency", "tps", "p50_ms", "p99_ms", "transactions",
                  "errors", "duration_s", "max_ms", "client_cpu_pct",
                  "server_cpu_pct": {process: pct}, "kernel_cpu_pct",
                  "other_cpu_pct"}, ...],
     "ratios": [{"name": "2pc/baseline-2pc", "concurrency", "ratio"}, ...],
     "failures": [{"name", "error"}], "warnings": [{"name", "warning"}]}

CPU figures are in % of one core over the measured window (200 = both cores of a
2-core machine): the load generator (this process), each server process, kernel
threads (``kernel_cpu_pct``: the journal and writeback work of fsyncs, mostly) and
``other_cpu_pct``, every other process on the machine (well above zero: the run was
disturbed). A ratio is only computed between two rows of the same run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.load import LoadResult

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


def result_row(name: str, load: LoadResult) -> dict[str, Any]:
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


def ratios(
    results: Sequence[Mapping[str, Any]], baselines: Mapping[str, str]
) -> list[dict[str, Any]]:
    """``tps(row) / tps(baseline)`` at every concurrency both rows of this run have."""
    tps = {(r["name"], r["concurrency"]): float(r["tps"]) for r in results}
    out: list[dict[str, Any]] = []
    for r in results:
        base = baselines.get(r["name"])
        if base is None:
            continue
        base_tps = tps.get((base, r["concurrency"]))
        if not base_tps:
            continue
        out.append(
            {
                "name": f"{r['name']}/{base}",
                "concurrency": r["concurrency"],
                "ratio": round(float(r["tps"]) / base_tps, 3),
            }
        )
    return out


def build_report(
    *,
    command: str,
    settings: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    baselines: Mapping[str, str],
    failures: Sequence[Mapping[str, str]] = (),
    warnings: Sequence[Mapping[str, str]] = (),
    machine: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "machine": dict(machine if machine is not None else machine_info()),
        "command": command,
        "settings": dict(settings),
        "results": [dict(r) for r in results],
        "ratios": ratios(results, baselines),
        "failures": [dict(f) for f in failures],
        "warnings": [dict(w) for w in warnings],
    }


def write_report(path: Path, report: Mapping[str, Any]) -> None:
    """Writes atomically (temp file, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def render(console: Console, report: Mapping[str, Any]) -> None:
    m = report["machine"]
    table = Table(
        title=f"Accord benchmarks: {m['cpu']}, {m['cores']} cores, Python {m['python']}, "
        f"grpcio {m['grpcio']}",
        caption="CPU in % of one core over the measured window: "
        "gen = load generator, servers = each server process, kernel = kernel threads, "
        "other = every other process",
    )
    for col in ("row", "conc", "tx/s", "p50 ms", "p99 ms", "txns", "errors", "secs", "gen"):
        table.add_column(col, justify="left" if col == "row" else "right", no_wrap=True)
    table.add_column("servers", no_wrap=True)
    table.add_column("kernel", justify="right", no_wrap=True)
    table.add_column("other", justify="right", no_wrap=True)
    for r in report["results"]:
        servers = " ".join(f"{k}={v:.0f}" for k, v in r.get("server_cpu_pct", {}).items())
        table.add_row(
            r["name"],
            str(r["concurrency"]),
            f"{r['tps']:.1f}",
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            str(r["transactions"]),
            str(r["errors"]) if not r["errors"] else f"[red]{r['errors']}[/red]",
            f"{r['duration_s']:.1f}",
            f"{r.get('client_cpu_pct', 0.0):.0f}",
            servers,
            f"{r.get('kernel_cpu_pct', 0.0):.0f}",
            f"{r.get('other_cpu_pct', 0.0):.0f}",
        )
    console.print(table)
    for q in report["ratios"]:
        console.print(
            f"ratio {q['name']} at concurrency {q['concurrency']}: [bold]{q['ratio']:.3f}[/bold]"
        )
    for w in report["warnings"]:
        console.print(f"[yellow]warning[/yellow] {w['name']}: {w['warning']}", highlight=False)
    for f in report["failures"]:
        console.print(f"[red]FAILED[/red] {f['name']}: {f['error']}", highlight=False)
