"""``python -m bench.tracecost``: what tracing costs the coordinator, per transaction.

The coordinator engine runs in this process as in ``python -m bench.engine`` (real WAL,
in-process participants that answer OK after one event-loop turn, no gRPC), each
transaction started under a remote parent context as the gRPC handler makes it (a
client's ``traceparent``), and its spans exported over OTLP/gRPC to ``bench.otlp_sink``
in a process of its own. Modes, run interleaved (``--rounds`` times each, in turn):

* ``off``: no tracing (the baseline);
* ``sdk``: the OpenTelemetry SDK (``TracerProvider``, ``BatchSpanProcessor``,
  ``OTLPSpanExporter``): what Accord used before ``common/_tracer.py``;
* ``lean``: ``Telemetry.setup`` as ``accord coordinator`` runs it (the lean tracer).

Reported: process CPU time (every thread: the export thread included) per transaction,
after a flush of the spans still queued, and the spans exported per transaction.

    python -m bench.tracecost [--transactions 4000] [--concurrency 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context

from accord.common import runner
from accord.common.telemetry import Telemetry, incoming_context
from accord.coordinator import BranchSpec, CoordinatorConfig, Engine
from accord.coordinator._server import tune_gc
from accord.coordinator._telemetry import CoordinatorTelemetry
from accord.coordinator.wal import WAL
from bench.engine import InstantParticipants

MODES = ("off", "sdk", "lean")
_PARENT = (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),)


def telemetry_for(mode: str, endpoint: str) -> Telemetry:
    if mode == "off":
        return Telemetry.disabled()
    if mode == "lean":
        return Telemetry.setup("accord-coordinator", env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "accord-coordinator"}))
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    t = Telemetry(tracer=provider.get_tracer("accord"), tracing=True)
    t._tracer_provider = provider
    t._exporters.append(exporter)
    return t


async def one_round(mode: str, endpoint: str, transactions: int, concurrency: int) -> float:
    branches = [
        BranchSpec(service="bank-a", operation="debit", payload=b'{"account":"a-1","amount":1}'),
        BranchSpec(service="bank-b", operation="credit", payload=b'{"account":"b-1","amount":1}'),
    ]
    telemetry = telemetry_for(mode, endpoint)
    per_worker = max(1, transactions // concurrency)
    with tempfile.TemporaryDirectory(prefix="accord-tracecost-") as tmp:
        wal, _ = await WAL.open(Path(tmp) / "wal")
        engine = Engine(
            wal=wal,
            calls=InstantParticipants(),
            config=CoordinatorConfig(),
            telemetry=CoordinatorTelemetry(telemetry),
        )

        async def worker() -> None:
            parent = incoming_context(_PARENT) if telemetry.tracing else None
            if parent is not None:
                otel_context.attach(parent)  # as the gRPC handler does (its own task)
            for _ in range(per_worker):
                txn = await engine.execute(key="", timeout_ms=10_000, branches=branches)
                await txn.finished.wait()

        await asyncio.gather(*(worker() for _ in range(4)))  # warm-up
        provider: Any = telemetry.tracer_provider()
        if provider is not None:
            provider.force_flush()
        t0 = time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        if provider is not None:
            await asyncio.to_thread(provider.force_flush)
        cpu = time.process_time() - t0
        await engine.close()
        await wal.close()
    telemetry.shutdown()
    return cpu / (per_worker * concurrency) * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracecost", description=__doc__)
    parser.add_argument("--transactions", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    sink = subprocess.Popen(
        [sys.executable, "-m", "bench.otlp_sink", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sink.stdout is not None
        endpoint = "http://" + sink.stdout.readline().split()[-1]
        os.environ["OTEL_EXPORTER_OTLP_INSECURE"] = "true"
        tune_gc()
        results: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(args.rounds):
            order = modes if r % 2 == 0 else list(reversed(modes))
            for mode in order:
                us = runner.run(one_round(mode, endpoint, args.transactions, args.concurrency))
                results[mode].append(round(us, 1))
                print(f"round {r + 1} {mode}: {us:.0f} us CPU per transaction", file=sys.stderr)
    finally:
        sink.terminate()
        sink.wait(10)
    print(
        json.dumps(
            {
                "transactions_per_round": args.transactions,
                "concurrency": args.concurrency,
                "cpu_us_per_txn": results,
                "median": {m: statistics.median(v) for m, v in results.items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
