"""Duplicate Prepare/Commit/Abort deliveries to a real bank process change balances
once; an Abort before its Prepare refuses the late Prepare."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tests.integration._bank_helpers import BankProcesses, branch, status_of

pytestmark = pytest.mark.integration


@pytest.fixture
async def banks(tmp_path: Path) -> AsyncIterator[BankProcesses]:
    procs = BankProcesses(tmp_path)
    yield procs
    await procs.stop_all()


async def test_duplicates_change_balances_once(banks: BankProcesses, tmp_path: Path) -> None:
    bank = await banks.start(tmp_path / "bank.db", accounts=2, initial_balance=100)
    stub = bank.participant
    debit = branch("t1", "b1", "debit", "bank-0", 30)
    credit = branch("t1", "b2", "credit", "bank-1", 30)

    # Sequential and concurrent duplicates of every phase.
    for _ in range(2):
        for req in (debit, credit):
            assert (await stub.Prepare(req)).message == "prepared"
    await asyncio.gather(*(stub.Prepare(r) for r in (debit, credit) for _ in range(5)))
    assert await bank.balances() == {"bank-0": (100, 30), "bank-1": (100, 0)}
    await asyncio.gather(*(stub.Commit(r) for r in (debit, credit) for _ in range(5)))
    for req in (debit, credit):
        assert (await stub.Commit(req)).message == "committed"
    assert await bank.balances() == {"bank-0": (70, 0), "bank-1": (130, 0)}

    # An aborted transfer: duplicates of Prepare and Abort release the hold once.
    undo = branch("t2", "b1", "debit", "bank-1", 50)
    for _ in range(3):
        await stub.Prepare(undo)
    assert await bank.balances() == {"bank-0": (70, 0), "bank-1": (130, 50)}
    await asyncio.gather(*(stub.Abort(undo) for _ in range(5)))
    assert await bank.balances() == {"bank-0": (70, 0), "bank-1": (130, 0)}
    code, details = await status_of(stub.Commit(undo))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "already aborted" in details

    summary = await bank.summary()
    assert (summary.total, summary.total_held, summary.prepared_branches) == (200, 0, 0)
    assert await bank.stop() == 0  # SIGTERM: graceful stop, exit code 0


async def test_abort_before_prepare_refuses_the_late_prepare(
    banks: BankProcesses, tmp_path: Path
) -> None:
    bank = await banks.start(tmp_path / "bank.db", accounts=1, initial_balance=100)
    late = branch("t3", "b1", "debit", "bank-0", 60)
    assert (await bank.participant.Abort(late)).message == "no-op: aborted before prepare"
    code, details = await status_of(bank.participant.Prepare(late))
    assert code == grpc.StatusCode.ABORTED and "already aborted" in details
    assert await bank.balances() == {"bank-0": (100, 0)}  # nothing held: no hanging


async def test_refusals_over_the_wire(banks: BankProcesses, tmp_path: Path) -> None:
    bank = await banks.start(tmp_path / "bank.db", accounts=1, initial_balance=10)
    stub = bank.participant
    code, details = await status_of(stub.Prepare(branch("t4", "b1", "debit", "bank-0", 11)))
    assert code == grpc.StatusCode.ABORTED and details.startswith("insufficient funds")
    code, _ = await status_of(stub.Prepare(branch("", "b1", "debit", "bank-0", 1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = await status_of(stub.Commit(branch("t5", "b1", "debit", "bank-0", 1)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    reply = await stub.Prepare(branch("t6", "b1", "balance", "bank-0"))
    assert reply.read_only
