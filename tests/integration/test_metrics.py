"""Metrics through a real Prometheus: Debian's ``prometheus`` (installed by ``make
test``), started here on a free port with a generated config (scrape every second) and
a temporary TSDB, scrapes a coordinator and two bank participants serving
``--metrics-listen``; after a known workload the counters read back through
Prometheus's HTTP API must be exactly the workload's."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import accord.v1 as pb
from accord.client import AccordClient, Branch, SagaStep
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, free_port, open_accounts

PROMETHEUS = "/usr/bin/prometheus"


class Prometheus:
    def __init__(self, root: Path, targets: list[str]) -> None:
        binary = shutil.which("prometheus") or PROMETHEUS
        if not Path(binary).exists():
            pytest.fail(
                "prometheus is not installed: run `make test` (it installs Debian's "
                "prometheus package) or `apt-get install prometheus`"
            )
        self.port = free_port()
        config = root / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": "accord", "static_configs": [{"targets": targets}]}
                    ],
                }
            )
        )
        self.log = (root / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={root / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(
                        f"prometheus did not start: {(root / 'prometheus.log').read_text()}"
                    )
                time.sleep(0.1)

    def query(self, promql: str) -> float | None:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[list[Prometheus]]:
    started: list[Prometheus] = []
    try:
        yield started
    finally:
        for p in started:
            p.stop()


def transfer(amount: int) -> list[Branch]:
    return [
        Branch(service="bank-a", operation="debit", payload={"account": "a", "amount": amount}),
        Branch(service="bank-b", operation="credit", payload={"account": "b", "amount": amount}),
    ]


def saga(fail: bool) -> list[SagaStep]:
    return [
        SagaStep(
            name="take",
            service="bank-a",
            action="debit",
            compensation="refund",
            payload={"account": "a", "amount": 1},
        ),
        SagaStep(
            name="give",
            service="bank-b",
            action="debit" if fail else "credit",  # b cannot pay 1000: compensate
            compensation="refund" if fail else "uncredit",
            payload={"account": "b", "amount": 1000 if fail else 1},
            depends_on=("take",),
            max_attempts=1,
        ),
    ]


async def test_prometheus_reads_the_workload_back_exactly(
    cluster: Cluster, tmp_path: Path, prometheus_factory: list[Prometheus]
) -> None:
    ports = {name: free_port() for name in ("coordinator", "bank-a", "bank-b")}
    a = cluster.bank("bank-a", extra=["--metrics-listen", f"127.0.0.1:{ports['bank-a']}"])
    b = cluster.bank("bank-b", extra=["--metrics-listen", f"127.0.0.1:{ports['bank-b']}"])
    await open_accounts(a.address, {"a": 1000})
    await open_accounts(b.address, {"b": 0})
    coord = cluster.coordinator(
        {"bank-a": a.address, "bank-b": b.address},
        extra=["--metrics-listen", f"127.0.0.1:{ports['coordinator']}"],
    )
    prom = await asyncio.to_thread(Prometheus, tmp_path, [f"127.0.0.1:{p}" for p in ports.values()])
    prometheus_factory.append(prom)

    async with AccordClient(coord.address) as client:
        for _ in range(5):
            assert (await client.execute(transfer(10))).committed
        for _ in range(3):  # bank-a refuses: not enough money
            assert (await client.execute(transfer(100_000))).aborted
        for _ in range(2):
            assert (await client.start_saga(saga(fail=False))).completed
        assert (await client.start_saga(saga(fail=True))).compensated
        assert (await client.execute(transfer(1))).committed
    # A duplicate Prepare straight to bank-a is answered from its barrier, and the
    # branch it prepared is held until the Abort.
    async with grpc.aio.insecure_channel(a.address) as ch:
        stub = pb.ParticipantStub(ch)
        req = pb.BranchRequest(
            gid="manual-1", branch_id="b1", operation="debit", payload=b'{"account":"a","amount":1}'
        )
        await stub.Prepare(req, timeout=10)
        await stub.Prepare(req, timeout=10)
        held = 'sum(accord_participant_branches_prepared{service="bank-a"})'
        await assert_eventually(
            lambda: asyncio.to_thread(prom.query, held), lambda v: v == 1.0, what="held"
        )
        await stub.Abort(req, timeout=10)

    coordinator = f'{{instance="127.0.0.1:{ports["coordinator"]}"}}'
    bank_a = f'instance="127.0.0.1:{ports["bank-a"]}"'
    expected = {
        'sum(accord_transactions_started_total{protocol="2pc"})': 9.0,
        'sum(accord_transactions_started_total{protocol="saga"})': 3.0,
        'sum(accord_transactions_total{protocol="2pc",outcome="committed"})': 6.0,
        'sum(accord_transactions_total{protocol="2pc",outcome="aborted"})': 3.0,
        'sum(accord_transactions_total{protocol="saga",outcome="completed"})': 2.0,
        'sum(accord_transactions_total{protocol="saga",outcome="compensated"})': 1.0,
        "sum(accord_transactions_in_flight)": 0.0,
        "sum(accord_transactions_in_doubt)": 0.0,
        "sum(accord_transaction_duration_milliseconds_count)": 12.0,
        'sum(accord_phase_duration_milliseconds_count{phase="prepare"})': 9.0,
        'sum(accord_phase_duration_milliseconds_count{phase="decision"})': 9.0,
        'sum(accord_phase_duration_milliseconds_count{phase="commit"})': 6.0,
        'sum(accord_phase_duration_milliseconds_count{phase="step"})': 6.0,
        'sum(accord_phase_duration_milliseconds_count{phase="compensate"})': 1.0,
        'sum(accord_participant_call_duration_milliseconds_count{method="Prepare"})': 18.0,
        'sum(accord_participant_call_duration_milliseconds_count{method="Commit"})': 12.0,
        'sum(accord_participant_call_duration_milliseconds_count{method="Prepare",code="ABORTED"})': 3.0,
        'sum(accord_participant_call_duration_milliseconds_count{method="Execute",service="bank-b"})': 3.0,
        'sum(accord_participant_call_duration_milliseconds_count{method="Compensate",service="bank-a"})': 1.0,
        f"sum(accord_participant_call_retries_total{coordinator}) or vector(0)": 0.0,
        f'sum(accord_participant_barrier_hits_total{{{bank_a},op="prepare"}})': 1.0,
        f'sum(accord_participant_handler_duration_milliseconds_count{{{bank_a},op="prepare"}})': 11.0,
        f'sum(accord_participant_handler_duration_milliseconds_count{{{bank_a},op="execute"}})': 3.0,
        'sum(accord_participant_branches_prepared{service="bank-a"})': 0.0,
        'sum(accord_participant_branches_prepared{service="bank-b"})': 0.0,
    }

    async def read() -> dict[str, float | None]:
        return {q: await asyncio.to_thread(prom.query, q) for q in expected}

    await assert_eventually(read, lambda got: got == expected, timeout_s=20, what="metrics")
    # The WAL forced every COMMIT decision, and each saga's definition and state changes.
    fsyncs = await asyncio.to_thread(
        prom.query, "sum(accord_wal_fsync_duration_milliseconds_count)"
    )
    batches = await asyncio.to_thread(prom.query, "sum(accord_wal_batch_size_sum)")
    # At most: 6 COMMITs; 2 per completed saga (definition, COMPLETED), 3 for the
    # compensated one (definition, COMPENSATING, COMPENSATED); fewer when batched.
    assert fsyncs is not None and 1 <= fsyncs <= 6 + 2 * 2 + 3
    assert batches is not None and batches >= fsyncs
