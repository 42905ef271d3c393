"""``python -m bench.etcdcost``: what resolving services from etcd costs per transaction.

Starts the ``2pc-static`` and ``2pc-etcd`` rows in turn (``--rounds`` times each) and in
each runs ``--transactions`` transfers one at a time, then stays idle as long, then runs
them again. For every window it prints the wall time per transaction, the CPU each
process used, and the requests etcd received by method (from etcd's own ``/metrics``):
a cost that comes with transactions shows in the loaded windows only, a background cost
(lease keepalives, the watched cache's resync) in the idle ones as much.

    python -m bench.etcdcost [--transactions 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.load import process_cpu_s
from bench.rows import ROWS, RowEnv

_RECEIVED = re.compile(
    r'^grpc_server_msg_received_total\{grpc_method="(\w+)",[^}]*\} (\S+)$', re.MULTILINE
)


def etcd_requests(url: str) -> Counter[str]:
    """Messages etcd has received, by gRPC method (streams count every message)."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out: Counter[str] = Counter()
    for m in _RECEIVED.finditer(text):
        out[m.group(1)] += int(float(m.group(2)))
    return out


async def measure(row: str, transactions: int) -> None:
    env = RowEnv(name=row, data_dir=Path(tempfile.mkdtemp(prefix="accord-etcdcost-")))
    async with ROWS[row].factory(env) as target:
        etcd = target.processes.get("etcd")
        url = getattr(etcd, "url", "")
        pids = {name: p.pid for name, p in target.processes.items() if p.pid}
        txn = target.factory(0)
        for _ in range(20):  # connections made, caches warm
            await txn()
        loaded_s = 0.0
        for window in ("load", "idle", "load"):
            before = etcd_requests(url) if url else Counter()
            cpu = {name: process_cpu_s(pid) for name, pid in pids.items()}
            t0 = time.monotonic()
            if window == "load":
                for _ in range(transactions):
                    if not await txn():
                        print(f"{row}: a transaction failed", file=sys.stderr)
                loaded_s = time.monotonic() - t0
            else:
                await asyncio.sleep(loaded_s)
            elapsed = time.monotonic() - t0
            after = etcd_requests(url) if url else Counter()
            used = {name: (process_cpu_s(pid) - cpu[name]) * 1000 for name, pid in pids.items()}
            per_txn = f"{elapsed / transactions * 1000:.2f} ms/txn" if window == "load" else "idle"
            requests = {k: after[k] - before[k] for k in after if after[k] != before[k]}
            print(
                f"{row:10s} {window}: {elapsed:5.1f} s, {per_txn}; CPU ms "
                + " ".join(f"{n}={v:.0f}" for n, v in used.items())
                + (f"; etcd received {requests}" if url else "")
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.etcdcost", description=__doc__)
    parser.add_argument("--transactions", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    for r in range(args.rounds):
        rows = ("2pc-static", "2pc-etcd") if r % 2 == 0 else ("2pc-etcd", "2pc-static")
        for row in rows:
            asyncio.run(measure(row, args.transactions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
