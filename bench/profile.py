"""``python -m bench.profile --row 2pc``: where a row's processes spend their CPU.

Starts a benchmark row's topology (``bench/rows.py``), drives it closed loop, and while
the load runs samples every server process with py-spy (``--native``, so time in gRPC's
C core and in system calls is seen, not only Python frames). For each process it writes
the collapsed stacks (``OUT/<row>-<process>.txt``, one ``stack count`` line each: open
them in speedscope or any flame graph tool) and prints a breakdown of the main thread's
samples by layer: gRPC (its Python and C parts, and the ``sendmsg`` system calls it
makes), Accord's engine, the WAL, the participant SDK, telemetry, the event loop itself,
and waiting (``epoll``). Every process started is stopped by PID at the end.

py-spy needs ptrace rights over the processes (root, or ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from accord.common import runner
from bench.load import LoadSettings, run_closed_loop
from bench.rows import ROWS, RowEnv

#: Layers and how their frames are recognised (a frame is "function (file:line)").
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("waiting (epoll)", ("epoll_wait", "epoll_pwait")),
    ("gRPC sendmsg", ("sendmsg",)),
    ("gRPC", ("grpc/", "cygrpc", "libgrpc")),
    ("WAL", ("coordinator/wal/",)),
    ("telemetry", ("opentelemetry", "_telemetry.py")),
    ("SQLite store", ("participants/_store.py", "sqlite")),
    ("engine", ("coordinator/",)),
    ("participant SDK", ("participants/",)),
)


def classify(stack: Sequence[str]) -> str:
    """The layer of one sample (innermost frame last): the layer of the innermost frame
    that belongs to one, so a participant's handler called from gRPC's server loop counts
    as the SDK, and the gRPC call it makes counts as gRPC."""
    for frame in reversed(stack):
        for layer, marks in LAYERS:
            if any(m in frame for m in marks):
                return layer
    return "event loop, other"


def breakdown(collapsed: str) -> tuple[Counter[str], int]:
    """Samples of the main thread (stacks through ``asyncio.Runner.run``) by layer."""
    layers: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or "Runner.run" not in stack:
            continue
        n = int(count)
        total += n
        layers[classify(stack.split(";"))] += n
    return layers, total


async def profile_row(
    row: str,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    rate: int,
    out: Path,
    say: Console,
) -> dict[str, Path]:
    spec = ROWS[row]
    data = Path(tempfile.mkdtemp(prefix="accord-profile-"))
    env = RowEnv(name=row, data_dir=data)
    files: dict[str, Path] = {}
    spies: list[asyncio.subprocess.Process] = []
    try:
        async with spec.factory(env) as target:
            pids = {name: p.pid for name, p in target.processes.items() if p.pid}
            say.print(f"{row}: " + ", ".join(f"{n} pid {p}" for n, p in pids.items()))
            load = asyncio.create_task(
                run_closed_loop(
                    target.factory,
                    LoadSettings(
                        concurrency=concurrency,
                        warmup_s=warmup_s,
                        duration_s=duration_s,
                        max_transactions=10_000_000,
                    ),
                    server_pids=pids,
                )
            )
            await asyncio.sleep(warmup_s)
            for name, pid in pids.items():
                files[name] = out / f"{row}-{name}.txt"
                spies.append(
                    await asyncio.create_subprocess_exec(
                        *_py_spy(),
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        str(max(1, int(duration_s) - 1)),
                        "--rate",
                        str(rate),
                        "--native",
                        "--format",
                        "raw",
                        "--output",
                        str(files[name]),
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=asyncio.subprocess.PIPE,
                    )
                )
            result = await load
            for spy in spies:
                _, err = await spy.communicate()
                if spy.returncode != 0:
                    say.print(f"[yellow]py-spy failed:[/yellow] {err.decode(errors='replace')}")
            # Native sampling stops each process briefly per sample: slower than unprofiled.
            say.print(
                f"{result.tps:.1f} tx/s at {concurrency} in flight under the profiler, "
                f"p50 {result.p50_ms:.1f} ms"
            )
    finally:
        for spy in spies:
            if spy.returncode is None:
                spy.kill()
                await spy.wait()
        env.topology.stop()
        shutil.rmtree(data, ignore_errors=True)
    return {n: f for n, f in files.items() if f.exists()}


def _py_spy() -> list[str]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return [exe]


def render(say: Console, files: dict[str, Path]) -> None:
    table = Table(title="main thread samples by layer (% of that process's samples)")
    table.add_column("layer")
    per: dict[str, tuple[Counter[str], int]] = {
        n: breakdown(f.read_text()) for n, f in files.items()
    }
    for name in per:
        table.add_column(name, justify="right")
    order = [layer for layer, _ in LAYERS] + ["event loop, other"]
    for layer in order:
        table.add_row(
            layer,
            *(f"{100 * c[layer] / t:.1f}" if t else "-" for c, t in per.values()),
        )
    say.print(table)
    for name, f in files.items():
        say.print(f"{name}: {f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--row", default="2pc", choices=list(ROWS))
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--rate", type=int, default=97, help="samples per second")
    parser.add_argument("--out", type=Path, default=Path("profile-out"))
    args = parser.parse_args(argv)
    say = Console(width=None if sys.stdout.isatty() else 150)
    args.out.mkdir(parents=True, exist_ok=True)
    files = runner.run(
        profile_row(
            args.row, args.concurrency, args.warmup, args.duration, args.rate, args.out, say
        )
    )
    if not files:
        say.print("[red]no profile was recorded[/red]")
        return 1
    render(say, files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
