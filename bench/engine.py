"""``python -m bench.engine``: the coordinator engine's own CPU per transaction.

The engine (validation, state table, WAL records, the 2PC driver, telemetry with tracing
off) runs in this process on uvloop with the real WAL (group commit, fdatasync) in a
temporary directory. The participants are an in-process stand-in that answers every call
OK after one event-loop turn, so no gRPC and no participant is measured: what is left is
the per-transaction cost the engine adds on top of the RPCs that ``make bench`` counts.
Each round runs ``--transactions`` two-branch transactions, ``--concurrency`` at a time,
and reports process CPU time (all threads, WAL I/O thread included) per transaction.
Rounds follow each other in one engine, so a cost that grows with the number of finished
transactions it keeps shows as rounds getting slower.

    python -m bench.engine [--transactions 20000] [--concurrency 64] [--rounds 3]
                           [--subscribers N]

``--subscribers N`` attaches N in-process event-feed subscribers (``FeedHub.stream``,
each response serialized as gRPC would) for the whole run: the feed's own CPU per
transaction on the coordinator, without the RPC itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import accord.v1 as pb
from accord.common import runner
from accord.coordinator import BranchSpec, CoordinatorConfig, Engine, Method
from accord.coordinator._calls import CallResult, Verdict
from accord.coordinator._feed import FeedHub
from accord.coordinator._server import tune_gc
from accord.coordinator.wal import WAL

_OK = CallResult(Verdict.OK)


class InstantParticipants:
    """Answers every branch call OK after one event-loop turn (a stand-in, not a fake
    under test: the benchmark measures the engine, not this)."""

    def resolve(self, service: str, address: str) -> str:
        return address or f"{service}.local:1"

    def known(self, service: str) -> bool:
        return True

    def describe(self) -> str:
        return "in-process stand-in"

    async def send(
        self,
        method: Method,
        service: str,
        address: str,
        current: str,
        request: pb.BranchRequest,
        attempt_s: float,
        *,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> tuple[CallResult, str]:
        await asyncio.sleep(0)
        return _OK, current or self.resolve(service, address)

    async def call(
        self,
        method: Method,
        address: str,
        request: pb.BranchRequest,
        attempt_s: float,
        *,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> CallResult:
        await asyncio.sleep(0)
        return _OK

    async def close(self) -> None:
        return None


async def run(
    transactions: int, concurrency: int, rounds: int, gc_tuned: bool, subscribers: int = 0
) -> list[float]:
    branches = [
        BranchSpec(service="bank-a", operation="debit", payload=b'{"account":"a-1","amount":1}'),
        BranchSpec(service="bank-b", operation="credit", payload=b'{"account":"b-1","amount":1}'),
    ]
    per_worker = max(1, transactions // concurrency)
    with tempfile.TemporaryDirectory(prefix="accord-engine-bench-") as tmp:
        hub = FeedHub("bench", Path(tmp) / "wal") if subscribers else None
        wal, _ = await WAL.open(Path(tmp) / "wal", feed=hub)
        engine = Engine(wal=wal, calls=InstantParticipants(), config=CoordinatorConfig())
        sent = [0] * subscribers

        async def subscriber(i: int) -> None:
            assert hub is not None
            async for resp in hub.stream(0, 0):
                resp.SerializeToString()  # what gRPC does with each response
                sent[i] += len(resp.events)

        feeds = [asyncio.get_running_loop().create_task(subscriber(i)) for i in range(subscribers)]
        if gc_tuned:
            tune_gc()
        out: list[float] = []
        try:

            async def worker() -> None:
                for _ in range(per_worker):
                    txn = await engine.execute(key="", timeout_ms=10_000, branches=branches)
                    txn.to_pb()

            for _ in range(rounds):
                t0 = time.process_time()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                out.append((time.process_time() - t0) / (per_worker * concurrency) * 1e6)
        finally:
            if hub is not None:
                hub.close()
            await asyncio.gather(*feeds, return_exceptions=True)
            await engine.close()
            await wal.close()
        if subscribers:
            print(f"feed events per subscriber: {sent}", file=sys.stderr)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__)
    parser.add_argument("--transactions", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--default-gc", action="store_true", help="keep CPython's GC settings (no tune_gc)"
    )
    parser.add_argument(
        "--subscribers", type=int, default=0, help="in-process event-feed subscribers"
    )
    args = parser.parse_args(argv)
    us = runner.run(
        run(args.transactions, args.concurrency, args.rounds, not args.default_gc, args.subscribers)
    )
    print(
        json.dumps(
            {
                "transactions_per_round": args.transactions,
                "concurrency": args.concurrency,
                "gc": "default" if args.default_gc else "tuned",
                "subscribers": args.subscribers,
                "cpu_us_per_txn": [round(u, 1) for u in us],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
