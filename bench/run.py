"""``python -m bench.run --out bench/results.json``: every row, in interleaved rounds.

Every row's processes are started first and stay up for the whole run; then round after
round, each row is driven at each concurrency for one *window* (a warmup, then a measured
duration), in an order that changes from round to round (``bench/rounds.py``), and a
window disturbed by other processes is run again (bounded). After the last round each
row's check runs, then every process it started is stopped by PID (also on errors and
Ctrl-C). A row that fails is reported (and makes the exit code non-zero); the others
still run. ``--quick`` (``BENCH_QUICK=1 make bench``) is a short run of the same kind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console

from accord.common import runner
from accord.tools.topology import workdir
from bench.load import LoadSettings, run_closed_loop
from bench.ratios import bare_of, ratio_pairs
from bench.report import build_report, render, result_row, write_report
from bench.rounds import (
    DISTURBED_PCT,
    Reruns,
    Window,
    base_order,
    cpu_us_per_txn,
    measure_window,
    schedule,
)
from bench.rows import ROWS, RowEnv, RowSpec, Target

#: The defaults of ``make bench`` and of ``--quick``: rounds, concurrencies, a window's
#: warmup and measured seconds, re-runs of one disturbed window, and the share of the
#: run's windows that may be re-run in all. With 15 rows: 90 windows of about 5.2 s
#: each (measured: the last transactions in flight drain after each), about a minute of
#: start-up and one of checks and stops: about 10 minutes on a quiet 2-core machine, at
#: most about 11 with every re-run spent; each further row adds about 40 s.
FULL: dict[str, Any] = {
    "rounds": 3,
    "concurrency": (1, 64),
    "warmup": 1.0,
    "duration": 4.0,
    "max_reruns": 2,
    "rerun_share": 0.1,
}
#: About 2-3 minutes: one concurrency, short windows, still three rounds and every ratio.
QUICK: dict[str, Any] = {
    "rounds": 3,
    "concurrency": (64,),
    "warmup": 0.5,
    "duration": 1.0,
    "max_reruns": 1,
    "rerun_share": 0.1,
}


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    rows: tuple[RowSpec, ...]
    concurrency: tuple[int, ...]
    rounds: int
    warmup_s: float
    duration_s: float
    max_transactions: int
    max_reruns: int
    rerun_budget: int
    data_dir: Path | None
    seed: int
    quick: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.name for r in self.rows],
            "concurrency": list(self.concurrency),
            "rounds": self.rounds,
            "warmup_s": self.warmup_s,
            "duration_s": self.duration_s,
            "max_transactions": self.max_transactions,
            "max_reruns": self.max_reruns,
            "rerun_budget": self.rerun_budget,
            "disturbed_pct": DISTURBED_PCT,
            "seed": self.seed,
            "quick": self.quick,
        }


@dataclass(kw_only=True)
class Outcome:
    windows: list[Window] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)
    reruns: dict[str, int] = field(default_factory=dict)
    #: The rows whose processes started (the ratios are made of these).
    ran: list[str] = field(default_factory=list)
    #: Seconds: starting every row, running the windows, the whole run.
    startup_s: float = 0.0
    windows_s: float = 0.0
    elapsed_s: float = 0.0


@dataclass(kw_only=True)
class Live:
    """A row whose processes are up."""

    spec: RowSpec
    env: RowEnv
    target: Target
    stack: AsyncExitStack

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.target.processes.items()}


def _show_failure(env: RowEnv, say: Console) -> None:
    for p in env.topology.procs:
        if p.proc is not None and not p.alive():
            say.print(f"[dim]--- {p.name} output ---\n{p.output()[-3000:]}[/dim]")


async def start_row(spec: RowSpec, env: RowEnv, out: Outcome, say: Console) -> Live | None:
    stack = AsyncExitStack()
    stack.callback(env.topology.stop)  # whatever the row's own exit does
    try:
        target = await stack.enter_async_context(spec.factory(env))
    except Exception as e:
        out.failures.append({"name": spec.name, "error": f"{type(e).__name__}: {e}"})
        say.print(f"[red]{spec.name} failed to start:[/red] {e}")
        _show_failure(env, say)
        await stack.aclose()
        return None
    live = Live(spec=spec, env=env, target=target, stack=stack)
    say.print(
        f"[bold]{spec.name}[/bold]: "
        + ", ".join(
            [
                *(
                    f"{n} pid {pid} on {target.processes[n].address}"
                    for n, pid in live.pids.items()
                ),
                *(f"{n} pid {pid} (process tree)" for n, pid in target.process_trees.items()),
            ]
        )
    )
    return live


async def stop_row(live: Live, out: Outcome, say: Console, *, check: bool) -> None:
    """The row's check (after its last window), then its processes stopped by PID."""
    try:
        if check and live.target.check is not None:
            for w in await live.target.check():
                out.warnings.append({"name": live.spec.name, "warning": w})
    except Exception as e:
        out.failures.append({"name": live.spec.name, "error": f"check: {type(e).__name__}: {e}"})
        say.print(f"[red]{live.spec.name} check failed:[/red] {e}")
    finally:
        try:
            await live.stack.aclose()
        finally:
            live.env.topology.stop()


async def one_window(live: Live, c: int, idle: Sequence[Live], s: RunSettings, t0: float) -> Window:
    """One window of ``live`` at ``c`` in flight (``t0``: when the run began)."""
    load = await run_closed_loop(
        live.target.factory,
        LoadSettings(
            concurrency=c,
            warmup_s=s.warmup_s,
            duration_s=s.duration_s,
            max_transactions=s.max_transactions,
        ),
        server_pids=live.pids,
        server_trees=live.target.process_trees,
        idle_pids=[pid for o in idle for pid in o.pids.values()],
        idle_trees=[pid for o in idle for pid in o.target.process_trees.values()],
    )
    live.target.assert_alive()
    w = result_row(live.spec.name, load)
    w["cpu_us_per_txn"] = cpu_us_per_txn([w])
    w["ended_at_s"] = round(time.monotonic() - t0, 1)
    w["error_samples"] = list(load.error_samples)
    return w


async def run_all(s: RunSettings, console: Console) -> Outcome:
    # SIGTERM, like Ctrl-C, cancels the run: every finally block stops its processes.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    out = Outcome()
    live: dict[str, Live] = {}
    with workdir(s.data_dir, prefix="accord-bench-") as base:
        t0 = time.monotonic()
        try:
            for spec in s.rows:
                data = base / spec.name
                shutil.rmtree(data, ignore_errors=True)
                data.mkdir(parents=True)
                env = RowEnv(name=spec.name, data_dir=data, seed=s.seed)
                started = await start_row(spec, env, out, console)
                if started is not None:
                    live[spec.name] = started
                    out.ran.append(spec.name)
            out.startup_s = round(time.monotonic() - t0, 1)
            console.print(f"{len(live)} rows up in {out.startup_s:.0f} s")
            order = base_order(list(live), {n: ROWS[n].baseline for n in live})
            plan = schedule(order, s.concurrency, s.rounds)
            reruns = Reruns(per_window=s.max_reruns, budget=s.rerun_budget)
            console.print(
                f"{len(plan)} windows: {s.rounds} rounds x {len(s.concurrency)} concurrencies "
                f"x {len(order)} rows, each {s.warmup_s:g} s warm-up + {s.duration_s:g} s "
                f"measured; round 0's order: {', '.join(order)}"
            )
            for k, c, name in plan:
                lv = live.get(name)
                if lv is None:  # failed in an earlier round
                    continue
                idle = [o for n, o in live.items() if n != name]
                try:
                    attempts = await measure_window(partial(one_window, lv, c, idle, s, t0), reruns)
                except Exception as e:
                    out.failures.append({"name": name, "error": f"{type(e).__name__}: {e}"})
                    console.print(f"[red]{name} failed:[/red] {e}")
                    _show_failure(lv.env, console)
                    del live[name]
                    await stop_row(lv, out, console, check=False)
                    continue
                for w in attempts:
                    w["round"] = k
                    samples = w.pop("error_samples", [])
                    out.windows.append(w)
                    flag = ""
                    if w["disturbed"]:
                        flag = " [yellow]DISTURBED, " + ("kept" if w["kept"] else "again")
                        flag += "[/yellow]"
                    console.print(
                        f"  r{k} {name:<20} c={c:<3} {w['tps']:8.1f} tx/s  "
                        f"p50 {w['p50_ms']:7.2f} ms  p99 {w['p99_ms']:7.2f} ms  "
                        f"errors {w['errors']}  CPU gen {w['client_cpu_pct']:.0f}% "
                        f"kernel {w['kernel_cpu_pct']:.0f}% other {w['other_cpu_pct']:.0f}% "
                        f"(idle rows {w['idle_rows_cpu_pct']:.0f}%){flag}",
                        highlight=False,
                    )
                    for sample in samples:
                        out.warnings.append({"name": name, "warning": f"r{k} c={c}: {sample}"})
            for name in out.ran:
                flagged = [
                    w for w in out.windows if w["name"] == name and w["kept"] and w["disturbed"]
                ]
                if flagged:
                    worst = max(
                        float(w["other_cpu_pct"]) - float(w["idle_rows_cpu_pct"]) for w in flagged
                    )
                    out.warnings.append(
                        {
                            "name": name,
                            "warning": f"{len(flagged)} windows kept disturbed (no re-run "
                            f"left): processes outside the run used up to {worst:.0f}% of a core",
                        }
                    )
            out.reruns = {
                "used": reruns.used,
                "budget": reruns.budget,
                "per_window": reruns.per_window,
            }
            out.windows_s = round(time.monotonic() - t0 - out.startup_s, 1)
            for name in list(live):
                await stop_row(live.pop(name), out, console, check=True)
            out.elapsed_s = round(time.monotonic() - t0, 1)
        finally:
            # Left here only on an error or Ctrl-C: every process first (by PID, not
            # interruptible), then what the rows hold in this process.
            rest = list(live.values())[::-1]
            for lv in rest:
                lv.env.topology.stop()
            for lv in rest:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await lv.stack.aclose()
    return out


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"concurrencies must be >= 1: {text!r}")
    return values


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Accord benchmarks: every row at each concurrency, closed loop, in "
        "interleaved rounds; ratios as the median of the rounds with their range.",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a short run (defaults {QUICK}) instead of the full one ({FULL})",
    )
    parser.add_argument("--rounds", type=int, default=None, metavar="N", help="rounds (>= 1)")
    parser.add_argument("--duration", type=float, default=None, metavar="S", help="measured")
    parser.add_argument("--warmup", type=float, default=None, metavar="S", help="not measured")
    parser.add_argument("--concurrency", type=_int_list, default=None, metavar="N,N,...")
    parser.add_argument(
        "--max-reruns",
        type=int,
        default=None,
        metavar="N",
        help=f"run a disturbed window (other processes above {DISTURBED_PCT:g}%% of a core) "
        "again at most N times, then keep it flagged",
    )
    parser.add_argument(
        "--rerun-budget",
        type=int,
        default=None,
        metavar="N",
        help="re-runs in the whole run (default: a share of the windows)",
    )
    parser.add_argument("--only", default="", metavar="NAME,...", help="run only these rows")
    parser.add_argument(
        "--max-transactions",
        type=int,
        default=200_000,
        metavar="N",
        help="a measured window also ends after N transactions",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="keep WALs, databases and logs here"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--list", action="store_true", help="list the rows and ratios, exit")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key in ("rounds", "concurrency", "warmup", "duration", "max_reruns"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.rerun_share = preset["rerun_share"]
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # Wide enough for the table when the output is not a terminal (make, CI, a pipe).
    console = Console(width=None if sys.stdout.isatty() else 150)
    defined = {spec.name: spec.baseline for spec in ROWS.values()}
    if args.list:
        for spec in ROWS.values():
            vs = f" (vs {spec.baseline})" if spec.baseline else ""
            console.print(f"{spec.name}: {spec.description}{vs}")
        pairs, skipped = ratio_pairs(defined, ROWS)
        console.print("ratios: " + ", ".join(q.name for q in pairs))
        for q in skipped:
            console.print(f"ratio {q.name} skipped: {q.note}")
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        console.print(f"[red]error:[/red] unknown rows {unknown}; known: {list(ROWS)}")
        return 2
    rows = tuple(ROWS[n] for n in ROWS if n in names)
    windows = args.rounds * len(args.concurrency) * len(rows)
    settings = RunSettings(
        rows=rows,
        concurrency=args.concurrency,
        rounds=args.rounds,
        warmup_s=args.warmup,
        duration_s=args.duration,
        max_transactions=args.max_transactions,
        max_reruns=args.max_reruns,
        rerun_budget=(
            args.rerun_budget
            if args.rerun_budget is not None
            else math.ceil(windows * args.rerun_share)
        ),
        data_dir=args.data_dir.resolve() if args.data_dir else None,
        seed=args.seed,
        quick=args.quick,
    )
    try:
        outcome = runner.run(run_all(settings, console))
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("[red]interrupted[/red]: every process was stopped; no report written")
        return 130
    pairs, skipped = ratio_pairs(defined, outcome.ran)
    report = build_report(
        command=shlex.join(["python", "-m", "bench.run", *argv]),
        settings={
            **settings.to_dict(),
            "startup_s": outcome.startup_s,
            "windows_s": outcome.windows_s,
            "elapsed_s": outcome.elapsed_s,
        },
        windows=outcome.windows,
        pairs=pairs,
        skipped=skipped,
        bare={n: bare_of(n, defined) for n in defined},
        reruns=outcome.reruns,
        failures=outcome.failures,
        warnings=outcome.warnings,
    )
    write_report(args.out, report)
    render(console, report)
    console.print(f"wrote {args.out}")
    return 1 if outcome.failures else 0


if __name__ == "__main__":
    sys.exit(main())
