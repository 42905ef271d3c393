"""What ``accord load`` shows: the live progress (stderr, twice a second), the final
table, the JSON report and the plot. The measuring is in :mod:`accord.tools._load`."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from accord.common import runner
from accord.common.exits import ExitCode
from accord.tools._load import LoadError, LoadSettings
from accord.tools._load_report import Report, merge_progress
from accord.tools._load_run import run_load


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.2f} ms"


def _title(s: Mapping[str, Any]) -> str:
    loop = f"open loop at {s['rate']:g}/s" if s["rate"] is not None else "closed loop"
    bound = (
        f"{s['transactions']:,} transactions"
        if s["transactions"] is not None
        else f"{s['duration_s']:g} s"
    )
    procs = f", {s['processes']} processes" if s["processes"] > 1 else ""
    return (
        f"{s['mode']}, {loop}, concurrency {s['concurrency']}{procs},"
        f" {s['branches']} branches, {bound}"
    )


def render_table(r: Mapping[str, Any]) -> Group:
    """The end-of-run summary of a report (the dict written as JSON): a line saying what
    ran, then the table."""
    table = Table(show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    table.add_column()
    table.add_row(
        "throughput",
        f"{r['throughput_tps']:,.1f} tx/s",
        f"{r['transactions']:,} transactions in {r['duration_s']:.2f} s",
    )
    table.add_row("succeeded", f"{r['success_tps']:,.1f} tx/s", f"{r['succeeded']:,}")
    lat = r["latency_ms"]
    for key in ("p50", "p90", "p99", "p99.9", "max"):
        table.add_row(f"latency {key}", _ms(lat[key]), "")
    for state, n in r["outcomes"].items():
        style = "green" if state in ("COMMITTED", "COMPLETED") else "yellow"
        table.add_row(f"[{style}]{state}[/{style}]", f"{n:,}", r["samples"].get(state, ""))
    for code, n in r["errors"].items():
        table.add_row(f"[red]error {code}[/red]", f"{n:,}", r["samples"].get(code, ""))
    ol = r["open_loop"]
    if ol is not None:
        table.add_row(
            "open loop",
            f"{ol['scheduled']:,} started",
            f"{ol['late']:,} late (> {ol['late_threshold_ms']:g} ms), {ol['dropped']:,} dropped,"
            f" max start delay {ol['max_start_delay_ms']:,.1f} ms",
        )
    gen = r["generator"]
    procs = gen["processes"]
    per = ", ".join(f"{p['cpu_pct']:.0f}%" for p in procs)
    style = "red" if gen["saturated"] else ""
    table.add_row(
        "generator CPU",
        f"[{style}]{gen['busiest_cpu_pct']:.0f}% of a core[/{style}]"
        if style
        else f"{gen['busiest_cpu_pct']:.0f}% of a core",
        f"busiest of {len(procs)} process{'es' if len(procs) > 1 else ''} ({per});"
        f" {gen['cpus']} CPUs",
    )
    for w in r["warnings"]:
        table.add_row("[red]warning[/red]", "", f"[red]{w}[/red]")
    return Group(Text.assemble(("accord load: ", "bold"), _title(r["settings"])), table)


class LiveView:
    """The live progress: the latest snapshot of every process, merged when drawn."""

    def __init__(self, settings: LoadSettings, console: Console) -> None:
        self.settings = settings
        self.snapshots: dict[int, dict[str, Any]] = {}
        self.t0 = time.perf_counter()
        # Live redraws this object (``__rich__``) at every refresh, so the clock ticks
        # even between snapshots.
        self.live = Live(self, console=console, refresh_per_second=2, transient=True)

    def update(self, snapshot: dict[str, Any]) -> None:
        self.snapshots[int(snapshot["index"])] = snapshot

    def __rich__(self) -> Group:
        return self.render()

    def render(self) -> Group:
        s = self.settings
        elapsed = time.perf_counter() - self.t0
        if not self.snapshots:
            return Group(Text(f"accord load: starting ({elapsed:.1f} s)"))
        p = merge_progress(dict(self.snapshots))  # a copy: Live draws from its own thread
        if p["measured_s"] < 0:
            phase = f"warming up, {-p['measured_s']:.1f} s left"
        else:
            phase = f"measuring {p['measured_s']:.1f} s"
            if s.duration_s is not None:
                phase += f" of {s.duration_s:g}"
        done = f"{p['count']:,}" + (f" of {s.transactions:,}" if s.transactions else "")
        line = Text.assemble(
            ("accord load ", "bold"),
            f"{elapsed:6.1f} s  {phase}  ",
            ("done ", "dim"),
            done,
            ("  tx/s ", "dim"),
            f"{p['tps']:,.1f}",
            ("  p50 ", "dim"),
            _ms(p["p50_ms"]),
            ("  p99 ", "dim"),
            _ms(p["p99_ms"]),
        )
        parts: list[Text] = [line]
        outcomes = "  ".join(f"{k} {v:,}" for k, v in sorted(p["outcomes"].items()))
        if outcomes:
            parts.append(Text("  " + outcomes, style="dim"))
        if p["errors"]:
            errors = "  ".join(f"{k} {v:,}" for k, v in sorted(p["errors"].items()))
            parts.append(Text("  errors: " + errors, style="red"))
        return Group(*parts)


async def _run_with_view(settings: LoadSettings, view: LiveView | None) -> Report:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Ctrl-C finishes the run early and still reports what was measured.
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        return await run_load(settings, on_progress=view.update if view else None, stop=stop)
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def run_command(
    settings: LoadSettings,
    *,
    json_out: str = "",
    plot: Path | None = None,
    progress: bool | None = None,
) -> int:
    """``accord load``: runs, shows, writes; returns the exit status (1 when the run could
    not start or no transaction succeeded)."""
    err = Console(stderr=True)
    to_stdout = json_out == "-"
    out = err if to_stdout else Console()
    settings.validate()
    for flag, target in (("--json", "" if to_stdout else json_out), ("--plot", plot or "")):
        # Found out now, not after the run.
        if target and not Path(target).resolve().parent.is_dir():
            err.print(f"[red]error:[/red] load: {flag}: no directory for {target}", highlight=False)
            return ExitCode.FAILURE
    show = err.is_terminal if progress is None else progress
    view = LiveView(settings, err) if show else None
    try:
        if view is not None:
            with view.live:
                report = runner.run(_run_with_view(settings, view))
        else:
            report = runner.run(_run_with_view(settings, None))
    except LoadError as e:
        err.print(f"[red]error:[/red] load: {e}", highlight=False, soft_wrap=True)
        return ExitCode.FAILURE
    out.print(render_table(report.data))
    if to_stdout:
        sys.stdout.write(json.dumps(report.data) + "\n")
        sys.stdout.flush()
    try:
        if json_out and not to_stdout:
            Path(json_out).write_text(json.dumps(report.data, indent=1) + "\n")
        if plot is not None:
            from accord.tools._load_plot import plot_report

            plot_report(report.data, report.hist, plot)
            err.print(f"plot written to {plot}", highlight=False)
    except OSError as e:
        err.print(f"[red]error:[/red] load: {e}", highlight=False, soft_wrap=True)
        return ExitCode.FAILURE
    if report.exit_code:
        why = "no transaction succeeded" if report.data["transactions"] else "nothing ran"
        err.print(f"[red]error:[/red] load: {why}", highlight=False)
    return report.exit_code
