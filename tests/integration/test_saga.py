"""Sagas across real processes: three bank participants, a real coordinator SIGKILLed at
each saga failpoint and restarted on its WAL; a compensation that cannot run leaves the
saga STUCK until an operator retries it; malformed definitions are refused."""

from __future__ import annotations

import grpc
import pytest

import accord.v1 as pb
from accord.client import AccordClient, AccordClientError, SagaStep
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, balances, free_port, open_accounts


def step(
    name: str, service: str, action: str, compensation: str, payload: dict[str, object], *deps: str
) -> SagaStep:
    return SagaStep(
        name=name,
        service=service,
        action=action,
        compensation=compensation,
        payload=payload,
        depends_on=deps,
        max_attempts=3,
        initial_interval_ms=20,
        max_interval_ms=100,
    )


def transfer_saga(fail_last: bool) -> list[SagaStep]:
    """Move 30 from x (bank-a) to y (bank-b, 15) and z (bank-c, 15); with fail_last the
    last step debits an empty account instead, so the saga compensates."""
    last = (
        step("c", "bank-c", "debit", "refund", {"account": "empty", "amount": 15}, "b")
        if fail_last
        else step("c", "bank-c", "credit", "uncredit", {"account": "z", "amount": 15}, "b")
    )
    return [
        step("a", "bank-a", "debit", "refund", {"account": "x", "amount": 30}),
        step("b", "bank-b", "credit", "uncredit", {"account": "y", "amount": 15}, "a"),
        last,
    ]


async def banks(cluster: Cluster, c_port: int = 0) -> dict[str, str]:
    a, b = cluster.bank("bank-a"), cluster.bank("bank-b")
    c = cluster.bank("bank-c", port=c_port)
    await open_accounts(a.address, {"x": 100})
    await open_accounts(b.address, {"y": 0})
    await open_accounts(c.address, {"z": 0, "empty": 0})
    return {"bank-a": a.address, "bank-b": b.address, "bank-c": c.address}


async def totals(services: dict[str, str]) -> tuple[int, int, int]:
    out = []
    for name in ("bank-a", "bank-b", "bank-c"):
        r = await balances(services[name])
        out.append(r.total)
    return out[0], out[1], out[2]


CRASHES = [
    ("before_step_send=crash", False, "COMPLETED"),
    ("before_step_send=crash-after:1", False, "COMPLETED"),
    ("after_step_result=crash", False, "COMPLETED"),
    ("after_step_result=crash-after:2", False, "COMPLETED"),
    ("after_step_result=crash-after:2", True, "COMPENSATED"),
    ("mid_compensation=crash", True, "COMPENSATED"),
]


@pytest.mark.parametrize(("failpoint", "fail_last", "expected"), CRASHES)
async def test_coordinator_crash_at_each_saga_step(
    cluster: Cluster, failpoint: str, fail_last: bool, expected: str
) -> None:
    services = await banks(cluster)
    coord = cluster.coordinator(services, env={"ACCORD_FAILPOINTS": failpoint})
    port = int(coord.address.rsplit(":", 1)[1])
    async with AccordClient(coord.address, timeout_s=20) as client:
        with pytest.raises(AccordClientError):
            await client.start_saga(transfer_saga(fail_last), idempotency_key="s1")
    assert coord.wait(15) != 0
    coord2 = cluster.coordinator(services, port=port)
    async with AccordClient(coord2.address, timeout_s=20) as client:
        result = await client.start_saga(transfer_saga(fail_last), idempotency_key="s1")
        assert result.state == expected, result
    moved = (70, 15, 15) if expected == "COMPLETED" else (100, 0, 0)
    got = await assert_eventually(
        lambda: totals(services), lambda t: t == moved, timeout_s=10, what="balances"
    )
    assert sum(got) == 100


async def test_stuck_saga_is_listed_and_an_operator_retry_finishes_it(cluster: Cluster) -> None:
    # bank-c is down from the start: step c's action never gets an answer, so it may
    # have run and must be compensated, and that compensation cannot run either.
    c_port = free_port()
    services = await banks(cluster, c_port=c_port)
    bank_c = cluster.procs[-1]
    bank_c.stop()
    coord = cluster.coordinator(services)
    async with AccordClient(coord.address) as client:
        result = await client.start_saga(transfer_saga(fail_last=False), idempotency_key="s2")
        assert result.state == "STUCK"
        assert "compensation of step c" in result.reason
        steps = {s.name: s.state for s in result.steps}
        # Reverse dependency order: b and a wait for c, whose compensation cannot run.
        assert steps == {"a": "SUCCEEDED", "b": "SUCCEEDED", "c": "COMPENSATING"}
        stuck, _ = await client.list(states=["STUCK"])
        assert [t.gid for t in stuck] == [result.gid]
        cluster.bank("bank-c", port=c_port)  # back, on the same DB
        # The operator retries until the compensations go through (each retry has a
        # fresh budget of attempts; the coordinator reconnects within a second).
        fixed = await assert_eventually(
            lambda: client.retry(result.gid), lambda t: t.state == "COMPENSATED", timeout_s=15
        )
        assert {s.name: s.state for s in fixed.steps} == {
            "a": "COMPENSATED",
            "b": "COMPENSATED",
            "c": "COMPENSATED",
        }
    # c's compensation arrived before (instead of) its action: a recorded no-op.
    assert await totals(services) == (100, 0, 0)


async def test_bad_definitions_are_refused_and_nothing_is_kept(cluster: Cluster) -> None:
    coord = cluster.coordinator({"bank-a": "127.0.0.1:9"})

    def st(name: str, *deps: str, compensation: str = "refund") -> pb.SagaStep:
        return pb.SagaStep(
            name=name,
            service="bank-a",
            action="debit",
            compensation=compensation,
            depends_on=list(deps),
        )

    cases = {
        "empty": [],
        "cycle": [st("a", "b"), st("b", "a")],
        "unknown dependency": [st("a", "zz")],
        "missing compensation": [st("a", compensation="")],
        "oversize payload": [
            pb.SagaStep(
                name="a", service="bank-a", action="debit", compensation="r", payload=b"x" * 300_000
            )
        ],
    }
    async with grpc.aio.insecure_channel(coord.address) as ch:
        stub = pb.CoordinatorStub(ch)
        for name, steps in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.StartSaga(pb.StartSagaRequest(definition=pb.SagaDefinition(steps=steps)))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        listed = await stub.ListTransactions(pb.ListTransactionsRequest())
        assert list(listed.transactions) == []


async def test_independent_steps_are_in_flight_together(cluster: Cluster) -> None:
    services = await banks(cluster)
    # Each step's result is held 300 ms after it arrives, so the watch below starts
    # while the first steps are still in flight.
    coord = cluster.coordinator(services, env={"ACCORD_FAILPOINTS": "after_step_result=sleep:300"})
    steps = [
        step("a", "bank-a", "debit", "refund", {"account": "x", "amount": 10}),
        step("b", "bank-b", "credit", "uncredit", {"account": "y", "amount": 5}),
        step("c", "bank-c", "credit", "uncredit", {"account": "z", "amount": 5}, "a", "b"),
    ]
    async with AccordClient(coord.address) as client:
        started = await client.start_saga(steps, wait=False)
        seen = [{s.name: s.state for s in t.steps} async for t in client.watch(started.gid)]
    assert seen[-1] == {"a": "SUCCEEDED", "b": "SUCCEEDED", "c": "SUCCEEDED"}
    # a and b were both started (durably, before their actions were sent) while neither
    # had finished; c started only after both had succeeded.
    assert any(s["a"] == "RUNNING" and s["b"] == "RUNNING" for s in seen), seen
    for s in seen:
        if s["c"] != "PENDING":
            assert s["a"] == s["b"] == "SUCCEEDED", s
    assert await totals(services) == (90, 5, 5)
