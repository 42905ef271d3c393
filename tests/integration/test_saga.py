"""Sagas across real processes: three bank participants, a real coordinator SIGKILLed at
each saga failpoint and restarted on its WAL; a compensation that cannot run leaves the
saga STUCK until an operator retries it; a step whose service nobody listens on is never
delivered and not compensated; malformed definitions are refused."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest

import accord.v1 as pb
from accord.client import AccordClient, AccordClientError, SagaStep
from accord.coordinator.wal import drop_unsynced
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


@dataclass(frozen=True)
class Crash:
    """The coordinator SIGKILLs itself at ``failpoint``; with ``power_loss`` the WAL's
    unsynced tail is dropped as well (a machine's power cut: the step records, which
    only ride the group commit, are gone, while the banks keep what they did); with
    ``late`` the coordinator comes back after the saga's deadline (it then compensates
    whatever has no outcome on disk)."""

    failpoint: str
    fail_last: bool
    expected: str
    power_loss: bool = False
    late: bool = False
    #: Compensations of actions that never arrived, (service, step), that the restart
    #: must send (recorded as no-ops by the banks' barriers).
    null: tuple[tuple[str, str], ...] = ()


CRASHES = [
    # Before step a is sent: its start record was appended, never written.
    Crash("before_step_send=crash", False, "COMPLETED"),
    # Before b is sent: a's records written (a SIGKILL keeps the page cache), b's not.
    Crash("before_step_send=crash-after:1", False, "COMPLETED"),
    # ... and a's records lost too, while bank-a applied a: a is sent again (a duplicate).
    Crash("before_step_send=crash-after:1", False, "COMPLETED", power_loss=True),
    # ... and back after the deadline: a compensated though its start is lost; b and c,
    # never sent, get null compensations.
    Crash(
        "before_step_send=crash-after:1",
        False,
        "COMPENSATED",
        power_loss=True,
        late=True,
        null=(("bank-b", "b"), ("bank-c", "c")),
    ),
    # a sent and applied, its answer not logged; its start record present, then lost.
    Crash("after_step_result=crash", False, "COMPLETED"),
    Crash("after_step_result=crash", False, "COMPLETED", power_loss=True),
    # a and b applied, every step record lost, back after the deadline: both undone.
    Crash(
        "after_step_result=crash-after:1",
        False,
        "COMPENSATED",
        power_loss=True,
        late=True,
        null=(("bank-c", "c"),),
    ),
    Crash("after_step_result=crash-after:2", False, "COMPLETED"),
    Crash("after_step_result=crash-after:2", True, "COMPENSATED"),
    # c refused, nothing but the definition on disk: a and b sent again, c refused again
    # (the barrier kept its answer), a and b undone.
    Crash("after_step_result=crash-after:2", True, "COMPENSATED", power_loss=True),
    # The decision to compensate is forced: the compensations' records may be lost.
    Crash("mid_compensation=crash", True, "COMPENSATED"),
    Crash("mid_compensation=crash", True, "COMPENSATED", power_loss=True),
]

#: The saga's deadline in the ``late`` cases (long enough for the first life's crash).
LATE_TIMEOUT_MS = 3_000


def null_compensations(db: Path) -> list[str]:
    """Steps whose compensation the bank's barrier recorded as a no-op (the action had
    not arrived)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT branch_id FROM accord_barrier WHERE op = 'compensate' AND message LIKE ?",
            ("no-op: compensated before%",),
        )
        return sorted(str(r[0]) for r in rows)


@pytest.mark.parametrize(
    "crash",
    CRASHES,
    ids=[
        f"{c.failpoint}-{'refused' if c.fail_last else 'ok'}"
        + ("-powerloss" if c.power_loss else "")
        + ("-late" if c.late else "")
        for c in CRASHES
    ],
)
async def test_coordinator_crash_at_each_saga_step(cluster: Cluster, crash: Crash) -> None:
    services = await banks(cluster)
    extra = ["--wal-sync-marker"] if crash.power_loss else []
    env = {"ACCORD_FAILPOINTS": crash.failpoint}
    coord = cluster.coordinator(services, env=env, extra=extra)
    port = int(coord.address.rsplit(":", 1)[1])
    timeout_ms = LATE_TIMEOUT_MS if crash.late else 0
    saga = transfer_saga(crash.fail_last)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with AccordClient(coord.address, timeout_s=20) as client:
        with pytest.raises(AccordClientError):
            await client.start_saga(saga, idempotency_key="s1", timeout_ms=timeout_ms)
    assert coord.wait(15) != 0
    if crash.power_loss:
        drop_unsynced(cluster.root / "wal")
    if crash.late:
        await asyncio.sleep(max(0.0, started + LATE_TIMEOUT_MS / 1000 + 0.5 - loop.time()))
    coord2 = cluster.coordinator(services, port=port, extra=extra)
    async with AccordClient(coord2.address, timeout_s=20) as client:
        result = await client.start_saga(saga, idempotency_key="s1", timeout_ms=timeout_ms)
        assert result.state == crash.expected, result
    moved = (70, 15, 15) if crash.expected == "COMPLETED" else (100, 0, 0)
    got = await assert_eventually(
        lambda: totals(services), lambda t: t == moved, timeout_s=10, what="balances"
    )
    assert sum(got) == 100
    nulls = [
        (service, step)
        for service in ("bank-a", "bank-b", "bank-c")
        for step in null_compensations(cluster.root / f"{service}.db")
    ]
    if not crash.late:
        # In time, a restart never compensates a step that did not run.
        assert nulls == [], nulls
    else:
        assert sorted(nulls) == sorted(crash.null), nulls


async def test_stuck_saga_is_listed_and_an_operator_retry_finishes_it(cluster: Cluster) -> None:
    # bank-c stops answering (SIGSTOP) after the coordinator is connected to it: step
    # c's action is sent and never answered, so it may have run and must be
    # compensated, and that compensation gets no answer either.
    services = await banks(cluster)
    bank_c = cluster.procs[-1]
    coord = cluster.coordinator(services)
    async with AccordClient(coord.address) as client:
        warm = await client.start_saga(transfer_saga(fail_last=False), idempotency_key="warm")
        assert warm.state == "COMPLETED"  # the coordinator is now connected to bank-c
        bank_c.pause()
        steps = transfer_saga(fail_last=False)
        steps[2] = replace(steps[2], timeout_ms=500)
        try:
            result = await client.start_saga(steps, idempotency_key="s2")
        finally:
            bank_c.resume()
        assert result.state == "STUCK", result
        assert "compensation of step c" in result.reason
        steps_now = {s.name: s.state for s in result.steps}
        # Reverse dependency order: b and a wait for c, whose compensation cannot run.
        assert steps_now == {"a": "SUCCEEDED", "b": "SUCCEEDED", "c": "COMPENSATING"}
        assert "DEADLINE_EXCEEDED" in result.steps[2].last_error
        stuck, _ = await client.list(states=["STUCK"])
        assert [t.gid for t in stuck] == [result.gid]
        # bank-c answers again. The operator retries until the compensations go
        # through (each retry has a fresh budget of attempts).
        fixed = await assert_eventually(
            lambda: client.retry(result.gid), lambda t: t.state == "COMPENSATED", timeout_s=15
        )
        assert {s.name: s.state for s in fixed.steps} == {
            "a": "COMPENSATED",
            "b": "COMPENSATED",
            "c": "COMPENSATED",
        }
    # Only the first saga's transfer is left: c's action, whether it ran when bank-c
    # woke up or was refused after its compensation, is undone.
    got = await assert_eventually(
        lambda: totals(services), lambda t: t == (70, 15, 15), timeout_s=10, what="balances"
    )
    assert sum(got) == 100


def trip_step(name: str, trip: str, *deps: str) -> SagaStep:
    return SagaStep(
        name=name,
        service=name,
        action="book",
        compensation="cancel",
        payload={"trip": trip, "city": "Lisbon"},
        depends_on=deps,
        max_attempts=3,
        initial_interval_ms=20,
        max_interval_ms=100,
    )


def booked(db: Path) -> dict[str, str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {str(t): str(s) for t, s in conn.execute("SELECT trip, status FROM bookings")}


@pytest.mark.parametrize("transport", ["unary", "stream"])
async def test_a_step_whose_service_nobody_listens_on_is_not_compensated(
    cluster: Cluster, transport: str
) -> None:
    """The car service is mapped to a port nothing listens on: none of its 3 attempts
    can reach it, so it is UNDELIVERED, gets no compensation, and the saga ends
    COMPENSATED (not STUCK) with the flight and hotel bookings cancelled."""
    topo = cluster.topology
    flight, hotel = topo.participant("flight"), topo.participant("hotel")
    nowhere = f"127.0.0.1:{free_port()}"
    coord = cluster.coordinator(
        {"flight": flight.address, "hotel": hotel.address, "car": nowhere},
        extra=["--participant-transport", transport],
    )
    steps = [
        trip_step("flight", "t1"),
        trip_step("hotel", "t1", "flight"),
        trip_step("car", "t1", "hotel"),
    ]
    async with AccordClient(coord.address, timeout_s=30) as client:
        result = await client.start_saga(steps, idempotency_key="trip-t1")
        assert result.state == "COMPENSATED", result
        assert result.reason.startswith("step car failed: not delivered"), result.reason
        by_name = {s.name: s for s in result.steps}
        assert {n: s.state for n, s in by_name.items()} == {
            "flight": "COMPENSATED",
            "hotel": "COMPENSATED",
            "car": "UNDELIVERED",
        }
        car = by_name["car"]
        assert car.attempts == 3 and car.compensation_attempts == 0, car
        assert "not sent" in car.last_error and nowhere in car.last_error, car
        assert (await client.get(result.gid)).steps[2].state == "UNDELIVERED"
    assert booked(topo.root / "flight.db") == {"t1": "CANCELLED"}
    assert booked(topo.root / "hotel.db") == {"t1": "CANCELLED"}
    # What an operator sees.
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "accord.tools.cli", "txn", "get", result.gid),
        *("--coordinator", coord.address, "--json"),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    doc = json.loads(out)
    assert doc["state"] == "COMPENSATED"
    assert [(s["name"], s["state"]) for s in doc["steps"]] == [
        ("flight", "COMPENSATED"),
        ("hotel", "COMPENSATED"),
        ("car", "UNDELIVERED"),
    ]


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
