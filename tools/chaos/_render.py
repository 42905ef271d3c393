"""A checker report for people: one table of invariants, then the smallest example of
each broken one (its history lines, audit rows and ledger entries)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from accord.tools.chaos._checker import Report, Violation

#: At most this many rows of each kind of evidence are shown per example.
_MAX_ROWS = 20


def render_report(report: Report, console: Console | None = None) -> None:
    console = console or Console()
    by_name = report.by_name()
    table = Table(title="Accord chaos check", title_justify="left")
    table.add_column("invariant")
    table.add_column("result")
    table.add_column("violations", justify="right")
    for name in report.checks:
        n = len(by_name.get(name, []))
        table.add_row(name, "[red]FAIL[/red]" if n else "[green]ok[/green]", str(n))
    console.print(table)
    stats = report.stats
    outcomes = stats.get("outcomes", {})
    console.print(
        f"operations {stats.get('operations', 0)} (ok {outcomes.get('ok', 0)},"
        f" fail {outcomes.get('fail', 0)}, info {outcomes.get('info', 0)});"
        f" transactions {stats.get('transactions', 0)} {stats.get('transaction_outcomes', {})};"
        f" faults {stats.get('faults', {})}; after heal {stats.get('after_heal_s')}s"
        f" (bound {report.recovery_bound_s}s)",
        markup=False,
    )
    for stuck in report.stuck:
        console.print(f"[yellow]STUCK[/yellow] saga {stuck['gid']}: {stuck.get('reason', '')}")
    for note in report.notes:
        console.print(f"[dim]note: {note}[/dim]")
    for name in report.checks:
        example = report.smallest(name)
        if example is not None:
            _example(console, example, len(by_name[name]))
    console.print(
        "[green]valid: no violations[/green]"
        if report.valid
        else f"[red]INVALID: {len(report.violations)} violations[/red]"
    )


def _example(console: Console, v: Violation, count: int) -> None:
    console.rule(f"[red]{v.name}[/red] ({count}; smallest example)")
    console.print(v.message, markup=False)
    if v.coordinator is not None:
        console.print(f"coordinator: {json.dumps(dict(v.coordinator))}", markup=False)
    if v.history:
        console.print("history:")
        for line in v.history[:_MAX_ROWS]:
            console.print(f"  {json.dumps(dict(line), separators=(',', ':'))}", markup=False)
    _rows(
        console,
        "audit",
        v.audit,
        ("participant", "seq", "branch_id", "op", "outcome", "source", "epoch", "at"),
    )
    _rows(
        console,
        "ledger",
        v.ledger,
        ("participant", "seq", "gid", "branch_id", "account", "delta", "balance_after"),
    )


def _rows(
    console: Console, title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]
) -> None:
    if not rows:
        return
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for row in rows[:_MAX_ROWS]:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(table)
    if len(rows) > _MAX_ROWS:
        console.print(f"  … {len(rows) - _MAX_ROWS} more")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    return "" if value is None else str(value)
