"""``python -m bench.run --out bench/results.json``: every row, each at every concurrency.

Each row's topology is started once, driven at each concurrency (warmup, then a measured
window), then every process it started is stopped by PID, also on errors and Ctrl-C. A
row that fails is reported (and makes the exit code non-zero); the others still run.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from accord.common import runner
from accord.tools.topology import workdir
from bench.load import LoadSettings, run_closed_loop
from bench.report import build_report, render, result_row, write_report
from bench.rows import ROWS, RowEnv, RowSpec

#: A window in which other processes used more than this (% of one core) is flagged.
DISTURBED_PCT = 10.0


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    rows: tuple[RowSpec, ...]
    concurrency: tuple[int, ...]
    warmup_s: float
    duration_s: float
    max_transactions: int
    data_dir: Path | None
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.name for r in self.rows],
            "concurrency": list(self.concurrency),
            "warmup_s": self.warmup_s,
            "duration_s": self.duration_s,
            "max_transactions": self.max_transactions,
            "seed": self.seed,
        }


@dataclass(kw_only=True)
class Outcome:
    results: list[dict[str, Any]]
    failures: list[dict[str, str]]
    warnings: list[dict[str, str]]


async def run_row(spec: RowSpec, env: RowEnv, s: RunSettings, out: Outcome, say: Console) -> None:
    try:
        async with spec.factory(env) as target:
            pids = {name: p.pid for name, p in target.processes.items()}
            say.print(
                f"[bold]{spec.name}[/bold]: "
                + ", ".join(
                    [
                        *(
                            f"{n} pid {pid} on {target.processes[n].address}"
                            for n, pid in pids.items()
                        ),
                        *(
                            f"{n} pid {pid} (process tree)"
                            for n, pid in target.process_trees.items()
                        ),
                    ]
                )
            )
            for c in s.concurrency:
                load = await run_closed_loop(
                    target.factory,
                    LoadSettings(
                        concurrency=c,
                        warmup_s=s.warmup_s,
                        duration_s=s.duration_s,
                        max_transactions=s.max_transactions,
                    ),
                    server_pids=pids,
                    server_trees=target.process_trees,
                )
                row = result_row(spec.name, load)
                out.results.append(row)
                say.print(
                    f"  c={c:<3} {load.tps:8.1f} tx/s  p50 {load.p50_ms:7.2f} ms  "
                    f"p99 {load.p99_ms:7.2f} ms  errors {load.errors}  "
                    f"CPU gen {load.client_cpu_pct:.0f}% kernel {load.kernel_cpu_pct:.0f}% "
                    f"other {load.other_cpu_pct:.0f}%"
                )
                if load.other_cpu_pct > DISTURBED_PCT:
                    out.warnings.append(
                        {
                            "name": spec.name,
                            "warning": f"c={c}: disturbed, other processes used "
                            f"{load.other_cpu_pct:.0f}% of a core during the window",
                        }
                    )
                for sample in load.error_samples:
                    out.warnings.append({"name": spec.name, "warning": f"c={c}: {sample}"})
                target.assert_alive()
            if target.check is not None:
                for w in await target.check():
                    out.warnings.append({"name": spec.name, "warning": w})
    except Exception as e:
        out.failures.append({"name": spec.name, "error": f"{type(e).__name__}: {e}"})
        say.print(f"[red]{spec.name} failed:[/red] {e}")
        for p in env.topology.procs:
            if p.proc is not None and not p.alive():
                say.print(f"[dim]--- {p.name} output ---\n{p.output()[-3000:]}[/dim]")
    finally:
        env.topology.stop()


async def run_all(s: RunSettings, console: Console) -> Outcome:
    # SIGTERM, like Ctrl-C, cancels the run: every finally block stops its processes.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    out = Outcome(results=[], failures=[], warnings=[])
    with workdir(s.data_dir, prefix="accord-bench-") as base:
        for spec in s.rows:
            data = base / spec.name
            shutil.rmtree(data, ignore_errors=True)
            data.mkdir(parents=True)
            env = RowEnv(name=spec.name, data_dir=data, seed=s.seed)
            await run_row(spec, env, s, out, console)
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
        description="Accord benchmarks: each row at each concurrency, closed loop.",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    parser.add_argument("--duration", type=float, default=10.0, metavar="S", help="measured")
    parser.add_argument("--warmup", type=float, default=2.0, metavar="S", help="not measured")
    parser.add_argument("--concurrency", type=_int_list, default=(1, 64), metavar="N,N,...")
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
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # Wide enough for the table when the output is not a terminal (make, CI, a pipe).
    console = Console(width=None if sys.stdout.isatty() else 150)
    if args.list:
        for spec in ROWS.values():
            vs = f" (vs {spec.baseline})" if spec.baseline else ""
            console.print(f"{spec.name}: {spec.description}{vs}")
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        console.print(f"[red]error:[/red] unknown rows {unknown}; known: {list(ROWS)}")
        return 2
    settings = RunSettings(
        rows=tuple(ROWS[n] for n in ROWS if n in names),
        concurrency=args.concurrency,
        warmup_s=args.warmup,
        duration_s=args.duration,
        max_transactions=args.max_transactions,
        data_dir=args.data_dir.resolve() if args.data_dir else None,
        seed=args.seed,
    )
    try:
        outcome = runner.run(run_all(settings, console))
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("[red]interrupted[/red]: every process was stopped; no report written")
        return 130
    report = build_report(
        command=shlex.join(["python", "-m", "bench.run", *argv]),
        settings=settings.to_dict(),
        results=outcome.results,
        baselines={s.name: s.baseline for s in ROWS.values() if s.baseline},
        failures=outcome.failures,
        warnings=outcome.warnings,
    )
    write_report(args.out, report)
    render(console, report)
    console.print(f"wrote {args.out}")
    return 1 if outcome.failures else 0


if __name__ == "__main__":
    sys.exit(main())
