"""``python -m bench.session_cpu``: CPU per transaction of the client and of every server
process, unary client against session client, on one topology (a coordinator and two
SQLite banks, as row ``2pc``), rounds interleaved (A, B, A, B, ...; the order of each
pair alternates). Only the client's mode changes between A and B, so the ratios hold
even on a machine shared with other work (CPU per transaction moves much less with
neighbours than throughput does).

    python -m bench.session_cpu [--transport unary|stream] [--rounds 4] [--txns 3000]
        [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from accord.client import AccordClient, Branch
from accord.common import runner
from bench.rows import (
    BANKS,
    RowEnv,
    accord_coordinator,
    bank_participants,
    open_bank_accounts,
    transfer_plan,
)

_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def drive(
    client: AccordClient, plan: Sequence[tuple[Branch, Branch]], txns: int, concurrency: int
) -> int:
    """Closed loop: ``concurrency`` workers, ``txns`` transactions in all; committed."""
    it = iter(range(txns))
    ok = 0

    async def worker(w: int) -> None:
        nonlocal ok
        for i in it:
            debit, credit = plan[(w * 7919 + i) % len(plan)]
            if (await client.execute([debit, credit])).committed:
                ok += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return ok


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="accord-session-cpu-") as tmp:
        env = RowEnv(name="session-cpu", data_dir=Path(tmp))
        try:
            banks = await bank_participants(env, BANKS)
            addresses = {name: p.address for name, p in banks.items()}
            coord = await accord_coordinator(env, addresses, transport=args.transport)
            await open_bank_accounts(env, addresses)
            pids = {"coordinator": coord.pid, **{n: p.pid for n, p in banks.items()}}
            plan = transfer_plan(env)
            clients = {
                mode: AccordClient(coord.address, session=mode, timeout_s=30)
                for mode in ("unary", "session")
            }
            for c in clients.values():
                await c.wait_ready()
                await drive(c, plan, 500, args.concurrency)  # warm both paths
            per: dict[str, dict[str, list[float]]] = {m: {} for m in clients}
            for r in range(args.rounds):
                order = ("unary", "session") if r % 2 == 0 else ("session", "unary")
                for mode in order:
                    before = {n: proc_cpu_s(p) for n, p in pids.items()}
                    me, t0 = time.process_time(), time.monotonic()
                    ok = await drive(clients[mode], plan, args.txns, args.concurrency)
                    wall = time.monotonic() - t0
                    cpu = {n: proc_cpu_s(p) - before[n] for n, p in pids.items()}
                    cpu["client"] = time.process_time() - me
                    row = {k: v / ok * 1e6 for k, v in cpu.items()}
                    row["tps"] = ok / wall
                    for k, v in row.items():
                        per[mode].setdefault(k, []).append(v)
                    print(
                        f"round {r} {mode:7s} tps {row['tps']:6.0f}  "
                        + "  ".join(f"{k} {v:5.0f}us" for k, v in row.items() if k != "tps"),
                        flush=True,
                    )
            print(
                f"median of {args.rounds} rounds, {args.txns} transactions each, "
                f"{args.concurrency} in flight, participant transport {args.transport}:"
            )
            for k in per["unary"]:
                u = statistics.median(per["unary"][k])
                s = statistics.median(per["session"][k])
                unit = "tx/s" if k == "tps" else "us/tx"
                print(
                    f"  {k:12s} unary {u:7.0f} {unit}  session {s:7.0f} {unit}  "
                    f"session/unary {s / u:5.2f}"
                )
            for c in clients.values():
                await c.close()
        finally:
            env.topology.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", choices=("unary", "stream"), default="unary")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--txns", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    runner.run(main(parser.parse_args()))
    sys.exit(0)
