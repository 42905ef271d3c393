"""The bank's arithmetic through the SDK (no network): holds, commits, aborts,
refusals, and no overdraft under concurrent prepares."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from accord.participants import BranchCall, Op, ParticipantService, Status, Store
from accord.participants.bank import account_id, bank_app, seed_accounts


@pytest.fixture
async def bank(tmp_path: Path) -> AsyncIterator[ParticipantService]:
    app = bank_app("bank", seed=seed_accounts("bank", 3, 100))
    svc = ParticipantService(app, Store(tmp_path / "bank.db"))
    await svc.open()
    yield svc
    await svc.close()


def move(
    gid: str,
    operation: str,
    account: str,
    amount: int | None = 10,
    *,
    branch: str = "b1",
    one_phase: bool = False,
) -> BranchCall:
    body: dict[str, object] = {"account": account}
    if amount is not None:
        body["amount"] = amount
    payload = json.dumps(body).encode()
    return BranchCall(
        gid=gid, branch_id=branch, operation=operation, payload=payload, one_phase=one_phase
    )


async def accounts(svc: ParticipantService) -> dict[str, tuple[int, int]]:
    def q(c: sqlite3.Connection) -> dict[str, tuple[int, int]]:
        return {i: (b, h) for i, b, h in c.execute("SELECT id, balance, held FROM accounts")}

    return await svc.store.read(q)


async def ledger(svc: ParticipantService) -> list[tuple[str, str, int]]:
    return await svc.store.read(
        lambda c: c.execute("SELECT gid, account, delta FROM ledger ORDER BY seq").fetchall()
    )


def test_seeded_account_naming() -> None:
    assert account_id("bank", 0) == "bank-0"
    assert seed_accounts("eu-bank", 2, 5) == [("eu-bank-0", 5), ("eu-bank-1", 5)]


async def test_debit_holds_then_commit_applies(bank: ParticipantService) -> None:
    assert (await bank.call(Op.PREPARE, move("g1", "debit", "bank-0", 30))).ok
    assert (await accounts(bank))["bank-0"] == (100, 30)
    assert (await bank.call(Op.COMMIT, move("g1", "debit", "bank-0", 30))).ok
    assert (await accounts(bank))["bank-0"] == (70, 0)
    assert await ledger(bank) == [("g1", "bank-0", -30)]


async def test_debit_abort_releases(bank: ParticipantService) -> None:
    await bank.call(Op.PREPARE, move("g1", "debit", "bank-0", 30))
    assert (await bank.call(Op.ABORT, move("g1", "debit", "bank-0", 30))).ok
    assert (await accounts(bank))["bank-0"] == (100, 0)
    assert await ledger(bank) == []


async def test_credit(bank: ParticipantService) -> None:
    assert (await bank.call(Op.PREPARE, move("g1", "credit", "bank-1", 5))).ok
    assert (await accounts(bank))["bank-1"] == (100, 0)  # nothing visible before commit
    assert (await bank.call(Op.COMMIT, move("g1", "credit", "bank-1", 5))).ok
    assert (await accounts(bank))["bank-1"] == (105, 0)
    await bank.call(Op.PREPARE, move("g2", "credit", "bank-1", 5))
    assert (await bank.call(Op.ABORT, move("g2", "credit", "bank-1", 5))).ok
    assert (await accounts(bank))["bank-1"] == (105, 0)
    assert await ledger(bank) == [("g1", "bank-1", 5)]


async def test_transfer_duplicates_apply_once(bank: ParticipantService) -> None:
    debit = move("t", "debit", "bank-0", 40, branch="b1")
    credit = move("t", "credit", "bank-1", 40, branch="b2")
    for _ in range(3):
        for c in (debit, credit):
            assert (await bank.call(Op.PREPARE, c)).ok
    for _ in range(3):
        for c in (debit, credit):
            assert (await bank.call(Op.COMMIT, c)).ok
    state = await accounts(bank)
    assert state["bank-0"] == (60, 0) and state["bank-1"] == (140, 0)
    assert sum(b for b, _ in state.values()) == 300


async def test_refusals(bank: ParticipantService) -> None:
    cases = {
        "insufficient funds": move("g1", "debit", "bank-0", 101),
        "unknown account": move("g2", "debit", "nobody", 1),
        "'amount' must be an integer": move("g3", "debit", "bank-0", 0),
        "'account' must be a non-empty string": move("g4", "credit", "", 1),
        "unknown operation 'steal'": move("g5", "steal", "bank-0", 1),
    }
    for expected, call in cases.items():
        r = await bank.call(Op.PREPARE, call)
        assert r.status is Status.REFUSED and expected in r.message, (expected, r)
    bad_json = BranchCall(gid="g6", branch_id="b1", operation="debit", payload=b"{nope")
    r = await bank.call(Op.PREPARE, bad_json)
    assert r.status is Status.REFUSED and "not JSON" in r.message
    not_object = BranchCall(gid="g7", branch_id="b1", operation="credit", payload=b"[1]")
    assert (await bank.call(Op.PREPARE, not_object)).status is Status.REFUSED
    float_amount = BranchCall(
        gid="g8", branch_id="b1", operation="debit", payload=b'{"account":"bank-0","amount":1.5}'
    )
    assert (await bank.call(Op.PREPARE, float_amount)).status is Status.REFUSED
    assert (await accounts(bank))["bank-0"] == (100, 0)


async def test_insufficient_funds_counts_holds(bank: ParticipantService) -> None:
    assert (await bank.call(Op.PREPARE, move("g1", "debit", "bank-0", 70))).ok
    r = await bank.call(Op.PREPARE, move("g2", "debit", "bank-0", 31))
    assert r.status is Status.REFUSED
    assert r.message == "insufficient funds: account 'bank-0' has 30 available, needs 31"
    assert (await bank.call(Op.PREPARE, move("g3", "debit", "bank-0", 30))).ok


async def test_balance_is_a_read_only_vote(bank: ParticipantService) -> None:
    r = await bank.call(Op.PREPARE, move("g1", "balance", "bank-2", None))
    assert r.ok and r.read_only
    r = await bank.call(Op.PREPARE, move("g2", "balance", "ghost", None))
    assert r.status is Status.REFUSED


async def test_one_phase_debit(bank: ParticipantService) -> None:
    r = await bank.call(Op.COMMIT, move("g1", "debit", "bank-0", 100, one_phase=True))
    assert r.ok
    r = await bank.call(Op.COMMIT, move("g2", "debit", "bank-0", 1, one_phase=True))
    assert r.status is Status.REFUSED and "insufficient funds" in r.message
    assert (await accounts(bank))["bank-0"] == (0, 0)


async def test_no_overdraft_under_concurrent_prepares(bank: ParticipantService) -> None:
    # 100 concurrent debits of 7 against a balance of 100: exactly 14 can be held.
    calls = [move(f"g{i}", "debit", "bank-0", 7) for i in range(100)]
    votes = await asyncio.gather(*(bank.call(Op.PREPARE, c) for c in calls))
    yes = [c for c, v in zip(calls, votes, strict=True) if v.ok]
    assert len(yes) == 14
    assert {v.status for v in votes} == {Status.OK, Status.REFUSED}
    assert (await accounts(bank))["bank-0"] == (100, 98)
    await asyncio.gather(*(bank.call(Op.COMMIT, c) for c in yes))
    assert (await accounts(bank))["bank-0"] == (2, 0)
    assert len(await ledger(bank)) == 14
