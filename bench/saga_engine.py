"""``python -m bench.saga_engine``: the coordinator engine's own CPU per saga.

Like ``bench.engine`` (which runs two-branch 2PC transactions), for the ``saga`` row's
shape: three chained steps, started with ``start_saga(wait=True)``, on uvloop with the
real WAL (group commit, fdatasync) in a temporary directory and participants that answer
OK after one event-loop turn (no gRPC). It reports process CPU time (all threads, the WAL
I/O thread included) per saga, the WAL's fdatasyncs per saga, and wall time per saga
(at ``--concurrency 1``, a saga's latency without the network: its fdatasync waits).

    python -m bench.saga_engine [--sagas 10000] [--concurrency 64] [--rounds 3]
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

from accord.common import runner
from accord.coordinator import CoordinatorConfig, Engine
from accord.coordinator._server import tune_gc
from accord.coordinator._specs import SagaSpec, StepSpec
from accord.coordinator.wal import WAL
from bench.engine import InstantParticipants


def definition() -> SagaSpec:
    def step(name: str, service: str, action: str, undo: str, *deps: str) -> StepSpec:
        return StepSpec(
            name=name,
            service=service,
            action=action,
            compensation=undo,
            payload=b'{"account":"a-1","amount":2}',
            depends_on=deps,
        )

    return SagaSpec(
        steps=(
            step("debit", "bank-a", "debit", "refund"),
            step("credit-b", "bank-b", "credit", "uncredit", "debit"),
            step("credit-c", "bank-c", "credit", "uncredit", "credit-b"),
        )
    )


async def run(sagas: int, concurrency: int, rounds: int) -> list[tuple[float, float, float]]:
    spec = definition()
    per_worker = max(1, sagas // concurrency)
    with tempfile.TemporaryDirectory(prefix="accord-saga-bench-") as tmp:
        wal, _ = await WAL.open(Path(tmp) / "wal")
        engine = Engine(wal=wal, calls=InstantParticipants(), config=CoordinatorConfig())
        tune_gc()
        out: list[tuple[float, float, float]] = []
        try:

            async def worker() -> None:
                for _ in range(per_worker):
                    txn = await engine.start_saga(
                        key="", timeout_ms=10_000, definition=spec, wait=True
                    )
                    assert txn.state.name == "COMPLETED", txn.reason
                    txn.to_pb()

            for _ in range(rounds):
                syncs = wal.stats.syncs
                t0, w0 = time.process_time(), time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                n = per_worker * concurrency
                cpu = (time.process_time() - t0) / n * 1e6
                out.append(
                    (cpu, (wal.stats.syncs - syncs) / n, (time.perf_counter() - w0) / n * 1e6)
                )
        finally:
            await engine.close()
            await wal.close()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.saga_engine", description=__doc__)
    parser.add_argument("--sagas", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    got = runner.run(run(args.sagas, args.concurrency, args.rounds))
    print(
        json.dumps(
            {
                "sagas_per_round": args.sagas,
                "concurrency": args.concurrency,
                "cpu_us_per_saga": [round(us, 1) for us, _, _ in got],
                "fsyncs_per_saga": [round(s, 3) for _, s, _ in got],
                "wall_us_per_saga": [round(w, 1) for _, _, w in got],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
