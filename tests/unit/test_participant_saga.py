"""Saga support in the participant SDK: Execute/Compensate in both styles, the barrier
rules for saga calls (DESIGN guarantee 5), fencing, the result contract over gRPC, and the
bank's saga operations (arithmetic, refusals, "not yet", conservation)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest

import accord.v1 as pb
from accord.common.transport import make_channel
from accord.participants import (
    BranchCall,
    NotYet,
    Op,
    Participant,
    ParticipantApp,
    ParticipantServer,
    ParticipantService,
    Refuse,
    Status,
    Store,
)
from accord.participants.bank import bank_app, seed_accounts

# -- a counting participant (subclass style) ----------------------------------------------


class Steps(Participant):
    """Records every handler run (in memory and, inside the local transaction, in a
    table) and behaves according to the operation name."""

    service = "steps"

    def __init__(self) -> None:
        self.runs: list[tuple[str, str, str, str]] = []
        self.compensate_ready = True

    def setup(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS effects (gid TEXT, branch_id TEXT, op TEXT, operation TEXT)"
        )

    def _effect(self, conn: sqlite3.Connection, call: BranchCall, op: str) -> None:
        self.runs.append((op, call.gid, call.branch_id, call.operation))
        conn.execute(
            "INSERT INTO effects VALUES (?, ?, ?, ?)",
            (call.gid, call.branch_id, op, call.operation),
        )

    def execute(self, conn: sqlite3.Connection, call: BranchCall) -> bytes | None:
        self._effect(conn, call, "execute")
        if call.operation == "no":
            raise Refuse("step failed for good")
        if call.operation == "later":
            raise NotYet("not ready")
        if call.operation == "result":
            return b"ticket-" + call.gid.encode()
        if call.operation == "text":
            return "not bytes"  # type: ignore[return-value]
        return None

    def compensate(self, conn: sqlite3.Connection, call: BranchCall) -> None:
        self._effect(conn, call, "compensate")
        if call.operation == "later" or not self.compensate_ready:
            raise NotYet("compensate later")
        if call.operation == "refuse":
            raise Refuse("I will not")


def sc(gid: str = "g1", step: str = "s1", operation: str = "ok", **kw: Any) -> BranchCall:
    return BranchCall(gid=gid, branch_id=step, operation=operation, **kw)


@pytest.fixture
def logic() -> Steps:
    return Steps()


@pytest.fixture
async def svc(tmp_path: Path, logic: Steps) -> AsyncIterator[ParticipantService]:
    service = ParticipantService(logic, Store(tmp_path / "p.db"))
    await service.open()
    yield service
    await service.close()


async def effects(svc: ParticipantService) -> list[tuple[str, str, str]]:
    return await svc.store.read(
        lambda c: c.execute("SELECT gid, branch_id, op FROM effects ORDER BY rowid").fetchall()
    )


def ops(logic: Steps) -> list[str]:
    return [run[0] for run in logic.runs]


# -- the barrier ---------------------------------------------------------------------------


async def test_duplicate_execute_answers_the_recorded_result(
    svc: ParticipantService, logic: Steps
) -> None:
    for _ in range(3):
        r = await svc.call(Op.EXECUTE, sc(operation="result"))
        assert r.status is Status.OK and r.result == b"ticket-g1" and r.message == "executed"
    assert ops(logic) == ["execute"]
    assert await effects(svc) == [("g1", "s1", "execute")]
    # No branch row: a saga step holds nothing between calls, so it is never in doubt.
    assert (await svc.branch_counts())["PREPARED"] == 0


async def test_concurrent_duplicate_executes_run_once(
    svc: ParticipantService, logic: Steps
) -> None:
    results = await asyncio.gather(
        *(svc.call(Op.EXECUTE, sc(operation="result")) for _ in range(20))
    )
    assert {(r.status, r.result) for r in results} == {(Status.OK, b"ticket-g1")}
    results = await asyncio.gather(
        *(svc.call(Op.COMPENSATE, sc(operation="undo")) for _ in range(20))
    )
    assert {r.message for r in results} == {"compensated"}
    assert ops(logic) == ["execute", "compensate"]


async def test_refused_execute_is_recorded_and_rolled_back(
    svc: ParticipantService, logic: Steps
) -> None:
    for _ in range(2):
        r = await svc.call(Op.EXECUTE, sc(operation="no"))
        assert r.status is Status.REFUSED and r.message == "step failed for good"
    assert ops(logic) == ["execute"]  # the duplicate did not run it again
    assert await effects(svc) == []  # the handler's own write was undone
    # Compensating a refused step: nothing to undo, the handler does not run.
    r = await svc.call(Op.COMPENSATE, sc(operation="undo"))
    assert r.status is Status.OK and r.message.startswith("no-op")
    assert ops(logic) == ["execute"]


async def test_execute_not_yet_is_not_recorded(svc: ParticipantService, logic: Steps) -> None:
    for _ in range(2):
        r = await svc.call(Op.EXECUTE, sc(operation="later"))
        assert r.status is Status.NOT_YET and r.message == "not ready"
    assert ops(logic) == ["execute", "execute"]  # retried for real
    assert await effects(svc) == []


async def test_compensate_before_execute_is_a_null_compensation(
    svc: ParticipantService, logic: Steps
) -> None:
    r = await svc.call(Op.COMPENSATE, sc(operation="undo"))
    assert r.status is Status.OK and "before the action" in r.message
    assert (await svc.call(Op.COMPENSATE, sc(operation="undo"))).ok  # duplicate
    # The late Execute is refused without running (no hanging), every time.
    for _ in range(2):
        late = await svc.call(Op.EXECUTE, sc(operation="result"))
        assert late.status is Status.REFUSED and "already compensated" in late.message
    assert logic.runs == []
    assert await effects(svc) == []


async def test_compensate_after_execute_not_yet_is_null(
    svc: ParticipantService, logic: Steps
) -> None:
    # The action said "not yet" (nothing happened), then the saga gave up on it.
    assert (await svc.call(Op.EXECUTE, sc(operation="later"))).status is Status.NOT_YET
    assert (await svc.call(Op.COMPENSATE, sc(operation="undo"))).ok
    assert (await svc.call(Op.EXECUTE, sc(operation="later"))).status is Status.REFUSED
    assert ops(logic) == ["execute"]


async def test_compensate_after_execute_runs_once(svc: ParticipantService, logic: Steps) -> None:
    assert (await svc.call(Op.EXECUTE, sc(operation="result"))).ok
    for _ in range(3):
        r = await svc.call(Op.COMPENSATE, sc(operation="undo"))
        assert r.status is Status.OK and r.message == "compensated"
    # A duplicate Execute after the compensation still gets its original answer.
    r = await svc.call(Op.EXECUTE, sc(operation="result"))
    assert r.ok and r.result == b"ticket-g1"
    assert logic.runs == [
        ("execute", "g1", "s1", "result"),
        ("compensate", "g1", "s1", "undo"),  # the compensation's own operation name
    ]
    assert await effects(svc) == [("g1", "s1", "execute"), ("g1", "s1", "compensate")]


async def test_steps_and_sagas_are_independent(svc: ParticipantService, logic: Steps) -> None:
    assert (await svc.call(Op.EXECUTE, sc("g1", "a"))).ok
    assert (await svc.call(Op.COMPENSATE, sc("g1", "b", "undo"))).ok  # null for step b
    assert (await svc.call(Op.EXECUTE, sc("g2", "b"))).ok  # same step name, other saga
    assert (await svc.call(Op.COMPENSATE, sc("g1", "a", "undo"))).ok
    assert (await svc.call(Op.EXECUTE, sc("g1", "b"))).status is Status.REFUSED
    assert [(op, gid, step) for op, gid, step, _ in logic.runs] == [
        ("execute", "g1", "a"),
        ("execute", "g2", "b"),
        ("compensate", "g1", "a"),
    ]


async def test_compensate_not_yet_is_retried(svc: ParticipantService, logic: Steps) -> None:
    assert (await svc.call(Op.EXECUTE, sc())).ok
    logic.compensate_ready = False
    for _ in range(2):
        r = await svc.call(Op.COMPENSATE, sc(operation="undo"))
        assert r.status is Status.NOT_YET and r.message == "compensate later"
    assert await effects(svc) == [("g1", "s1", "execute")]  # its writes were undone
    logic.compensate_ready = True
    assert (await svc.call(Op.COMPENSATE, sc(operation="undo"))).message == "compensated"
    assert (await svc.call(Op.COMPENSATE, sc(operation="undo"))).message == "compensated"
    assert ops(logic) == ["execute", "compensate", "compensate", "compensate"]


async def test_compensate_must_not_refuse(
    svc: ParticipantService, logic: Steps, caplog: pytest.LogCaptureFixture
) -> None:
    assert (await svc.call(Op.EXECUTE, sc())).ok
    with caplog.at_level(logging.ERROR, logger="accord.participant"):
        r = await svc.call(Op.COMPENSATE, sc(operation="refuse"))
    # "Not yet" (FAILED_PRECONDITION), not a recorded answer: retried, then STUCK.
    assert r.status is Status.NOT_YET and "I will not" in r.message
    assert "event=compensate_refused" in caplog.text
    assert await effects(svc) == [("g1", "s1", "execute")]
    assert (await svc.call(Op.COMPENSATE, sc(operation="refuse"))).status is Status.NOT_YET
    assert ops(logic) == ["execute", "compensate", "compensate"]


async def test_execute_result_must_be_bytes(svc: ParticipantService, logic: Steps) -> None:
    with pytest.raises(TypeError, match="expected bytes or None"):
        await svc.call(Op.EXECUTE, sc(operation="text"))
    assert await effects(svc) == []  # rolled back, nothing recorded: the retry runs again
    with pytest.raises(TypeError):
        await svc.call(Op.EXECUTE, sc(operation="text"))
    assert ops(logic) == ["execute", "execute"]


async def test_saga_answers_survive_reopen(tmp_path: Path, logic: Steps) -> None:
    first = ParticipantService(logic, Store(tmp_path / "p.db"))
    await first.open()
    await first.call(Op.EXECUTE, sc("g1", operation="result"))
    await first.call(Op.COMPENSATE, sc("g2", operation="undo"))
    await first.close()
    second = ParticipantService(logic, Store(tmp_path / "p.db"))
    await second.open()
    try:
        assert (await second.call(Op.EXECUTE, sc("g1", operation="result"))).result == b"ticket-g1"
        assert (await second.call(Op.EXECUTE, sc("g2"))).status is Status.REFUSED
    finally:
        await second.close()
    assert ops(logic) == ["execute"]


# -- fencing -------------------------------------------------------------------------------


async def test_fencing_applies_to_saga_calls(svc: ParticipantService, logic: Steps) -> None:
    assert (await svc.call(Op.EXECUTE, sc("g1", shard="s", epoch=5))).ok
    r = await svc.call(Op.EXECUTE, sc("g2", shard="s", epoch=4))
    assert r.status is Status.FENCED and r.message == "fenced: epoch 4 < 5 for shard 's'"
    # A deposed coordinator can neither compensate nor get a recorded answer.
    assert (await svc.call(Op.COMPENSATE, sc("g1", "s1", "undo", shard="s", epoch=4))).status is (
        Status.FENCED
    )
    assert (await svc.call(Op.EXECUTE, sc("g1", shard="s", epoch=4))).status is Status.FENCED
    # A 2PC call with a higher epoch raises the fence for saga calls too.
    assert (await svc.call(Op.ABORT, sc("g9", shard="s", epoch=7))).ok
    assert (await svc.call(Op.COMPENSATE, sc("g1", "s1", "undo", shard="s", epoch=6))).status is (
        Status.FENCED
    )
    assert (await svc.call(Op.COMPENSATE, sc("g1", "s1", "undo", shard="s", epoch=7))).ok
    # A refused step still raises the epoch.
    assert (await svc.call(Op.EXECUTE, sc("g3", operation="no", shard="s", epoch=8))).status is (
        Status.REFUSED
    )
    assert (await svc.call(Op.EXECUTE, sc("g4", shard="s", epoch=7))).status is Status.FENCED
    assert [(op, gid) for op, gid, _, _ in logic.runs] == [
        ("execute", "g1"),
        ("compensate", "g1"),
        ("execute", "g3"),
    ]


# -- the two styles ------------------------------------------------------------------------


def booking_app(runs: list[str]) -> ParticipantApp:
    app = ParticipantApp("booking")

    @app.setup
    def schema(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS seats (gid TEXT PRIMARY KEY, state TEXT)")

    @app.execute("book")
    def book(conn: sqlite3.Connection, call: BranchCall) -> bytes:
        runs.append("book")
        if call.json().get("full"):
            raise Refuse("sold out")
        conn.execute("INSERT INTO seats VALUES (?, 'BOOKED')", (call.gid,))
        return b"seat-12A"

    @app.compensate("cancel")
    def cancel(conn: sqlite3.Connection, call: BranchCall) -> None:
        runs.append("cancel")
        conn.execute("UPDATE seats SET state = 'CANCELLED' WHERE gid = ?", (call.gid,))

    @app.prepare("hold")  # 2PC and saga operations on one app
    def hold(conn: sqlite3.Connection, call: BranchCall) -> None:
        runs.append("hold")

    return app


async def test_decorator_style(tmp_path: Path) -> None:
    runs: list[str] = []
    app = booking_app(runs)
    assert app.operations == ("book", "cancel", "hold")
    svc = ParticipantService(app, Store(tmp_path / "b.db"))
    await svc.open()
    try:
        book = sc("g1", "flight", "book", payload=b"{}")
        r = await svc.call(Op.EXECUTE, book)
        assert r.ok and r.result == b"seat-12A"
        assert (await svc.call(Op.EXECUTE, book)).result == b"seat-12A"
        assert (await svc.call(Op.COMPENSATE, sc("g1", "flight", "cancel"))).ok
        full = sc("g2", "flight", "book", payload=b'{"full": true}')
        assert (await svc.call(Op.EXECUTE, full)).message == "sold out"
        # Unknown action: a business no naming the known ones.
        r = await svc.call(Op.EXECUTE, sc("g3", "x", "fly"))
        assert r.status is Status.REFUSED
        assert r.message == "unknown operation 'fly' (known: book)"
        # A 2PC operation name is not a saga action, and the other way round.
        assert (await svc.call(Op.EXECUTE, sc("g4", "x", "hold"))).status is Status.REFUSED
        assert (await svc.call(Op.PREPARE, sc("g5", "x", "book"))).status is Status.REFUSED
        # Unknown compensation of an executed step: "not yet" (retried; an operator sees
        # the saga STUCK), not recorded, so a fixed deployment can still compensate.
        assert (await svc.call(Op.EXECUTE, sc("g6", "flight", "book", payload=b"{}"))).ok
        r = await svc.call(Op.COMPENSATE, sc("g6", "flight", "uncancel"))
        assert r.status is Status.NOT_YET
        assert r.message == "no compensation handler for 'uncancel' (known: cancel)"
        assert (await svc.call(Op.COMPENSATE, sc("g6", "flight", "cancel"))).ok
        seats = await svc.store.read(
            lambda c: dict(c.execute("SELECT gid, state FROM seats").fetchall())
        )
        assert seats == {"g1": "CANCELLED", "g6": "CANCELLED"}
    finally:
        await svc.close()
    assert runs == ["book", "cancel", "book", "book", "cancel"]


def test_registering_twice_is_an_error() -> None:
    app = ParticipantApp("x")
    app.execute("a")(lambda conn, call: None)
    app.compensate("a")(lambda conn, call: None)  # another table: allowed
    with pytest.raises(ValueError, match="execute handler for 'a' registered twice"):
        app.execute("a")(lambda conn, call: None)
    with pytest.raises(ValueError, match="compensate handler for 'a' registered twice"):
        app.compensate("a")(lambda conn, call: None)
    with pytest.raises(ValueError, match="must not be empty"):
        app.execute("")(lambda conn, call: None)


async def test_subclass_defaults(tmp_path: Path) -> None:
    svc = ParticipantService(Participant(), Store(tmp_path / "d.db"))
    await svc.open()
    try:
        r = await svc.call(Op.EXECUTE, sc())
        assert r.status is Status.REFUSED and "unknown operation 'ok'" in r.message
        assert (await svc.call(Op.COMPENSATE, sc(operation="undo"))).ok  # refused: no-op
    finally:
        await svc.close()

    class ExecuteOnly(Participant):
        def execute(self, conn: sqlite3.Connection, call: BranchCall) -> bytes | None:
            return None

    svc = ParticipantService(ExecuteOnly(), Store(tmp_path / "e.db"))
    await svc.open()
    try:
        assert (await svc.call(Op.EXECUTE, sc())).ok
        r = await svc.call(Op.COMPENSATE, sc(operation="undo"))
        assert r.status is Status.NOT_YET and "no compensation handler for 'undo'" in r.message
    finally:
        await svc.close()


# -- over gRPC: the result contract -----------------------------------------------------------


async def code_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str, Any]:
    try:
        reply = await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or "", None
    return grpc.StatusCode.OK, "", reply


async def test_saga_calls_over_grpc(tmp_path: Path) -> None:
    runs: list[str] = []
    async with ParticipantServer(booking_app(runs), db=tmp_path / "g.db") as srv:
        channel = make_channel(srv.address)
        stub = pb.ParticipantStub(channel)

        def req(gid: str, operation: str, payload: bytes = b"{}", **kw: Any) -> pb.BranchRequest:
            return pb.BranchRequest(
                gid=gid, branch_id="flight", operation=operation, payload=payload, **kw
            )

        try:
            code, _, reply = await code_of(stub.Execute(req("g1", "book")))
            assert code == grpc.StatusCode.OK and reply.result == b"seat-12A"
            _, _, again = await code_of(stub.Execute(req("g1", "book")))
            assert again.result == b"seat-12A"
            code, details, _ = await code_of(stub.Execute(req("g2", "book", b'{"full": 1}')))
            assert (code, details) == (grpc.StatusCode.ABORTED, "sold out")
            code, details, _ = await code_of(stub.Execute(req("g3", "fly")))
            assert code == grpc.StatusCode.ABORTED and "known: book" in details
            code, _, reply = await code_of(stub.Compensate(req("g1", "cancel")))
            assert code == grpc.StatusCode.OK and reply.message == "compensated"
            code, _, _ = await code_of(stub.Compensate(req("g4", "cancel")))  # null
            assert code == grpc.StatusCode.OK
            code, details, _ = await code_of(stub.Execute(req("g4", "book")))
            assert code == grpc.StatusCode.ABORTED and "already compensated" in details
            await stub.Execute(req("g5", "book"))
            code, details, _ = await code_of(stub.Compensate(req("g5", "nope")))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "nope" in details
            await stub.Execute(req("g6", "book", shard="s", epoch=3))
            code, details, _ = await code_of(
                stub.Compensate(req("g6", "cancel", shard="s", epoch=2))
            )
            assert (code, details) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                "fenced: epoch 2 < 3 for shard 's'",
            )
        finally:
            await channel.close()
    assert runs == ["book", "book", "cancel", "book", "book"]


# -- the bank's saga operations ------------------------------------------------------------


@pytest.fixture
async def bank(tmp_path: Path) -> AsyncIterator[ParticipantService]:
    svc = ParticipantService(
        bank_app("bank", seed=seed_accounts("bank", 3, 100)), Store(tmp_path / "bank.db")
    )
    await svc.open()
    yield svc
    await svc.close()


def move(gid: str, operation: str, account: str, amount: int, *, step: str = "s1") -> BranchCall:
    payload = json.dumps({"account": account, "amount": amount}).encode()
    return BranchCall(gid=gid, branch_id=step, operation=operation, payload=payload)


async def accounts(svc: ParticipantService) -> dict[str, tuple[int, int]]:
    def q(c: sqlite3.Connection) -> dict[str, tuple[int, int]]:
        return {i: (b, h) for i, b, h in c.execute("SELECT id, balance, held FROM accounts")}

    return await svc.store.read(q)


async def ledger(svc: ParticipantService) -> list[tuple[str, str, str, int, int]]:
    return await svc.store.read(
        lambda c: c.execute(
            "SELECT gid, branch_id, account, delta, balance_after FROM ledger ORDER BY seq"
        ).fetchall()
    )


async def test_bank_saga_debit_and_refund(bank: ParticipantService) -> None:
    for _ in range(2):  # the duplicate debits once
        assert (await bank.call(Op.EXECUTE, move("g1", "debit", "bank-0", 30))).ok
    assert (await accounts(bank))["bank-0"] == (70, 0)
    for _ in range(2):  # the duplicate refunds once
        assert (await bank.call(Op.COMPENSATE, move("g1", "refund", "bank-0", 30))).ok
    assert (await accounts(bank))["bank-0"] == (100, 0)
    assert await ledger(bank) == [
        ("g1", "s1", "bank-0", -30, 70),
        ("g1", "s1/refund", "bank-0", 30, 100),
    ]


async def test_bank_saga_debit_insufficient_funds(bank: ParticipantService) -> None:
    r = await bank.call(Op.EXECUTE, move("g1", "debit", "bank-0", 101))
    assert r.status is Status.REFUSED and r.message.startswith("insufficient funds")
    # Funds held by a prepared 2PC debit are not available to a saga.
    assert (await bank.call(Op.PREPARE, move("g2", "debit", "bank-0", 60))).ok
    r = await bank.call(Op.EXECUTE, move("g3", "debit", "bank-0", 50))
    assert r.status is Status.REFUSED and "has 40 available" in r.message
    assert (await bank.call(Op.EXECUTE, move("g4", "debit", "bank-0", 40))).ok
    assert (await accounts(bank))["bank-0"] == (60, 60)
    # Refund of a refused debit: a no-op (the handler would have created money).
    assert (await bank.call(Op.COMPENSATE, move("g1", "refund", "bank-0", 101))).ok
    assert (await bank.call(Op.COMPENSATE, move("g3", "refund", "bank-0", 50))).ok
    assert (await accounts(bank))["bank-0"] == (60, 60)
    r = await bank.call(Op.EXECUTE, move("g5", "debit", "nobody", 1))
    assert r.status is Status.REFUSED and "unknown account" in r.message
    r = await bank.call(Op.EXECUTE, move("g6", "debit", "bank-0", 0))
    assert r.status is Status.REFUSED and "bad payload" in r.message


async def test_bank_saga_credit_and_uncredit(bank: ParticipantService) -> None:
    for _ in range(2):
        assert (await bank.call(Op.EXECUTE, move("g1", "credit", "bank-1", 25))).ok
    assert (await accounts(bank))["bank-1"] == (125, 0)
    for _ in range(2):
        assert (await bank.call(Op.COMPENSATE, move("g1", "uncredit", "bank-1", 25))).ok
    assert (await accounts(bank))["bank-1"] == (100, 0)
    assert [row[1:4] for row in await ledger(bank)] == [
        ("s1", "bank-1", 25),
        ("s1/uncredit", "bank-1", -25),
    ]
    r = await bank.call(Op.EXECUTE, move("g2", "credit", "nobody", 5))
    assert r.status is Status.REFUSED and "unknown account" in r.message


async def test_bank_uncredit_not_yet_when_the_funds_are_spent(bank: ParticipantService) -> None:
    assert (await bank.call(Op.EXECUTE, move("g1", "credit", "bank-2", 50))).ok  # 150
    assert (await bank.call(Op.EXECUTE, move("g2", "debit", "bank-2", 120))).ok  # 30 left
    for _ in range(2):
        r = await bank.call(Op.COMPENSATE, move("g1", "uncredit", "bank-2", 50))
        assert r.status is Status.NOT_YET and r.message.startswith("funds already spent")
    assert (await accounts(bank))["bank-2"] == (30, 0)
    # Money comes back (g2 compensated): the retried uncredit now goes through, once.
    assert (await bank.call(Op.COMPENSATE, move("g2", "refund", "bank-2", 120))).ok
    assert (await bank.call(Op.COMPENSATE, move("g1", "uncredit", "bank-2", 50))).ok
    assert (await bank.call(Op.COMPENSATE, move("g1", "uncredit", "bank-2", 50))).ok
    assert (await accounts(bank))["bank-2"] == (100, 0)
    assert sum(row[3] for row in await ledger(bank)) == 0


async def test_bank_uncredit_does_not_take_held_funds(bank: ParticipantService) -> None:
    assert (await bank.call(Op.EXECUTE, move("g1", "credit", "bank-0", 10))).ok  # 110
    assert (await bank.call(Op.PREPARE, move("g2", "debit", "bank-0", 105))).ok  # 5 free
    r = await bank.call(Op.COMPENSATE, move("g1", "uncredit", "bank-0", 10))
    assert r.status is Status.NOT_YET
    assert (await bank.call(Op.ABORT, move("g2", "debit", "bank-0", 105))).ok
    assert (await bank.call(Op.COMPENSATE, move("g1", "uncredit", "bank-0", 10))).ok
    assert (await accounts(bank))["bank-0"] == (100, 0)


async def test_bank_null_compensation_and_late_execute(bank: ParticipantService) -> None:
    # The refund overtakes its debit: no money appears, and the late debit never lands.
    assert (await bank.call(Op.COMPENSATE, move("g1", "refund", "bank-0", 30))).ok
    r = await bank.call(Op.EXECUTE, move("g1", "debit", "bank-0", 30))
    assert r.status is Status.REFUSED and "already compensated" in r.message
    assert (await bank.call(Op.COMPENSATE, move("g2", "uncredit", "bank-1", 30))).ok
    assert (await bank.call(Op.EXECUTE, move("g2", "credit", "bank-1", 30))).status is (
        Status.REFUSED
    )
    assert await accounts(bank) == {"bank-0": (100, 0), "bank-1": (100, 0), "bank-2": (100, 0)}
    assert await ledger(bank) == []


async def test_bank_sagas_conserve_money(bank: ParticipantService) -> None:
    """Sixty concurrent transfer sagas (debit one account, then credit another), every
    call delivered twice at once, as a coordinator would drive them: some complete, some
    are refused at the debit, some compensate after both steps (uncredit retried while
    the funds are spent), some lose the credit (compensated before it arrives). Money is
    conserved, no balance goes negative, and the ledger explains every balance."""
    rng = random.Random(7)
    names = ["bank-0", "bank-1", "bank-2"]

    async def twice(op: Op, call: BranchCall) -> Status:
        first, second = await asyncio.gather(bank.call(op, call), bank.call(op, call))
        assert first == second  # a duplicate gets the same answer
        return first.status

    async def saga(i: int) -> tuple[str, int]:
        """Runs one saga; returns its outcome and the ledger entries it must leave."""
        gid = f"t{i}"
        src, dst = rng.sample(names, 2)
        amount = rng.randint(1, 12) if i else 500  # saga t0 is always refused
        plan = rng.choice(["complete", "compensate", "lost-credit"])
        await asyncio.sleep(rng.random() / 100)
        if await twice(Op.EXECUTE, move(gid, "debit", src, amount, step="d")) is Status.REFUSED:
            status = await twice(Op.COMPENSATE, move(gid, "refund", src, amount, step="d"))
            assert status is Status.OK
            return "refused", 0
        if plan == "lost-credit":
            status = await twice(Op.COMPENSATE, move(gid, "uncredit", dst, amount, step="c"))
            assert status is Status.OK
            late = await twice(Op.EXECUTE, move(gid, "credit", dst, amount, step="c"))
            assert late is Status.REFUSED
            entries = 2
        else:
            status = await twice(Op.EXECUTE, move(gid, "credit", dst, amount, step="c"))
            assert status is Status.OK
            if plan == "complete":
                return "completed", 2
            for _ in range(50):
                status = await twice(Op.COMPENSATE, move(gid, "uncredit", dst, amount, step="c"))
                if status is Status.OK:
                    break
                assert status is Status.NOT_YET
                await asyncio.sleep(0.002)
            else:
                return "stuck", 2  # both steps stay applied: an operator's case
            entries = 4
        status = await twice(Op.COMPENSATE, move(gid, "refund", src, amount, step="d"))
        assert status is Status.OK
        return "compensated", entries

    results = await asyncio.gather(*(saga(i) for i in range(60)))
    outcomes = {outcome for outcome, _ in results}
    assert {"completed", "compensated", "refused"} <= outcomes
    balances = await accounts(bank)
    assert sum(b for b, _ in balances.values()) == 300
    assert all(b >= 0 and h == 0 for b, h in balances.values())
    entries = await ledger(bank)
    assert len(entries) == sum(n for _, n in results)  # each effect applied exactly once
    for account, (balance, _) in balances.items():
        assert balance == 100 + sum(row[3] for row in entries if row[2] == account)
