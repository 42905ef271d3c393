"""The saga rows of the benchmark harness: the bare saga baseline (in process), the saga
workload and its bookkeeping (fast, no subprocesses)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

import accord.v1 as pb
from accord.client._client import AccordClient, SagaStep, TxnResult
from accord.common.transport import TransportSettings, bind, make_server
from bench.baseline import BareCoordinator, BareParticipant
from bench.ratios import ratio_pairs
from bench.rounds import ratio_summaries
from bench.rows import ROWS, SAGA_BANKS, RowEnv, SagaTally, saga_factory, saga_plan


class RecordingParticipant(BareParticipant):
    """A bare participant that notes when each Execute starts and ends."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def Execute(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        self.log.append(f"start {request.branch_id}@{self.name}")
        await asyncio.sleep(0.01)
        self.log.append(f"end {request.branch_id}")
        return pb.BranchResponse(result=request.operation.encode())


@pytest.fixture
async def bare(tmp_path: Any) -> AsyncIterator[tuple[str, list[str]]]:
    """Three bare participants and the bare coordinator, in this process."""
    settings = TransportSettings()
    log: list[str] = []
    servers = []
    services = {}
    for name in SAGA_BANKS:
        server, _ = make_server(settings)
        pb.add_ParticipantServicer_to_server(RecordingParticipant(name, log), server)
        services[name] = f"127.0.0.1:{bind(server, '127.0.0.1:0', settings)}"
        await server.start()
        servers.append(server)
    server, _ = make_server(settings)
    port = bind(server, "127.0.0.1:0", settings)
    coordinator = BareCoordinator(services, f"127.0.0.1:{port}")
    pb.add_CoordinatorServicer_to_server(coordinator, server)
    await server.start()
    servers.append(server)
    try:
        yield f"127.0.0.1:{port}", log
    finally:
        for s in servers:
            await s.stop(None)
        await coordinator.close()


def _env(tmp_path: Any) -> RowEnv:
    return RowEnv(name="t", data_dir=tmp_path, accounts=10)


async def test_bare_saga_runs_a_chain_in_sequence(
    bare: tuple[str, list[str]], tmp_path: Any
) -> None:
    address, log = bare
    steps = saga_plan(_env(tmp_path), size=1)[0]
    async with AccordClient(address, timeout_s=10) as client:
        result = await client.start_saga(steps, wait=True)
    assert result.completed and result.protocol == "SAGA"
    assert [s.name for s in result.steps] == ["debit", "credit-b", "credit-c"]
    assert all(s.state == "SUCCEEDED" for s in result.steps)
    assert [s.result for s in result.steps] == [b"debit", b"credit", b"credit"]
    # Each step starts only once the one it depends on has returned.
    assert log == [
        "start debit@bank-a",
        "end debit",
        "start credit-b@bank-b",
        "end credit-b",
        "start credit-c@bank-c",
        "end credit-c",
    ]


async def test_bare_saga_runs_independent_steps_in_parallel(
    bare: tuple[str, list[str]],
) -> None:
    address, log = bare
    steps = [
        SagaStep(name="x", service="bank-a", action="debit"),
        SagaStep(name="y", service="bank-b", action="credit"),
        SagaStep(name="z", service="bank-c", action="credit", depends_on=("x", "y")),
    ]
    async with AccordClient(address, timeout_s=10) as client:
        result = await client.start_saga(steps)
    assert result.completed
    assert sorted(log[:2]) == ["start x@bank-a", "start y@bank-b"]
    assert log[-2:] == ["start z@bank-c", "end z"]


def test_saga_rows_registered_with_their_baseline() -> None:
    names = list(ROWS)
    assert names.index("baseline-saga") < names.index("saga")
    assert ROWS["saga"].baseline == "baseline-saga"
    assert ROWS["baseline-saga"].baseline is None
    windows = [
        {"name": "baseline-saga", "concurrency": 64, "tps": 500.0, "round": 0},
        {"name": "saga", "concurrency": 64, "tps": 400.0, "round": 0},
    ]
    for w in windows:
        w.update(transactions=100, duration_s=1.0)
    pairs, _ = ratio_pairs({s.name: s.baseline for s in ROWS.values()}, ["baseline-saga", "saga"])
    [q] = ratio_summaries(windows, pairs)
    assert (q["name"], q["concurrency"], q["median"], q["target"]) == (
        "saga/baseline-saga",
        64,
        0.8,
        0.8,
    )


def test_saga_plan_is_a_conserving_chain(tmp_path: Any) -> None:
    plan = saga_plan(_env(tmp_path), size=50)
    assert len(plan) == 50
    for debit, credit_b, credit_c in plan:
        assert [s.service for s in (debit, credit_b, credit_c)] == list(SAGA_BANKS)
        assert (debit.action, debit.compensation) == ("debit", "refund")
        assert (credit_b.action, credit_b.compensation) == ("credit", "uncredit")
        assert (credit_c.action, credit_c.compensation) == ("credit", "uncredit")
        assert (debit.depends_on, credit_b.depends_on, credit_c.depends_on) == (
            (),
            ("debit",),
            ("credit-b",),
        )
        amounts = []
        for step in (debit, credit_b, credit_c):
            assert isinstance(step.payload, bytes)
            data = json.loads(step.payload)
            assert data["account"].startswith(f"{step.service}-")
            assert 0 <= int(data["account"].rsplit("-", 1)[1]) < 10
            amounts.append(data["amount"])
        assert amounts == [2, 1, 1]
    assert plan == saga_plan(_env(tmp_path), size=50)  # seeded


class FakeClient:
    """Answers start_saga from a script: a state name, or an exception to raise."""

    def __init__(self, script: Sequence[str | BaseException]) -> None:
        self.script = list(script)
        self.calls = 0

    async def start_saga(self, steps: Sequence[SagaStep], *, wait: bool = True) -> TxnResult:
        assert wait and len(steps) == 3
        item = self.script[self.calls % len(self.script)]
        self.calls += 1
        if isinstance(item, BaseException):
            raise item
        if item == "HANG":
            await asyncio.sleep(3600)
        return TxnResult(gid=f"g{self.calls}", state=item, protocol="SAGA")


async def test_saga_factory_counts_what_did_not_complete(tmp_path: Any) -> None:
    client = FakeClient(["COMPLETED", "COMPENSATED", "STUCK", RuntimeError("boom"), "HANG"])
    tally = SagaTally()
    txn = saga_factory(client, saga_plan(_env(tmp_path), size=4), tally, 0.05)(0)  # type: ignore[arg-type]
    assert await txn() is True
    assert await txn() is False
    assert await txn() is False
    with pytest.raises(RuntimeError, match="boom"):
        await txn()
    with pytest.raises(TimeoutError, match="not ended"):
        await txn()
    assert tally.not_completed == {"COMPENSATED": 1, "STUCK": 1}
    assert tally.failed_calls == 2
    warnings = tally.warnings()
    assert len(warnings) == 2 and "2 sagas ended other than COMPLETED" in warnings[0]
    assert SagaTally().warnings() == []
