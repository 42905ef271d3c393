"""A bank SIGKILLed after voting yes keeps the branch prepared across the restart (funds
still held), and phase two afterwards applies exactly once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import accord.v1 as pb
from tests.integration._bank_helpers import BankProcess, BankProcesses, branch

pytestmark = pytest.mark.integration


@pytest.fixture
async def banks(tmp_path: Path) -> AsyncIterator[BankProcesses]:
    procs = BankProcesses(tmp_path)
    yield procs
    await procs.stop_all()


@pytest.mark.parametrize("phase_two", ["commit", "abort"])
async def test_prepared_branch_survives_sigkill(
    banks: BankProcesses, tmp_path: Path, phase_two: str
) -> None:
    bank = await banks.start(tmp_path / "bank.db", accounts=2, initial_balance=100)
    debit = branch("t1", "b1", "debit", "bank-0", 40)
    credit = branch("t1", "b2", "credit", "bank-1", 40)
    assert (await bank.participant.Prepare(debit)).message == "prepared"
    assert (await bank.participant.Prepare(credit)).message == "prepared"

    await bank.crash()  # SIGKILL right after the yes votes were answered
    bank = await banks.restart(bank)

    summary = await bank.summary()
    assert summary.prepared_branches == 2
    assert await bank.balances() == {"bank-0": (100, 40), "bank-1": (100, 0)}
    # A duplicate Prepare after the restart is answered from the barrier.
    assert (await bank.participant.Prepare(debit)).message == "prepared"

    async def phase_two_of(bank: BankProcess, req: pb.BranchRequest) -> None:
        stub = bank.participant
        await (stub.Commit(req) if phase_two == "commit" else stub.Abort(req))

    for _ in range(3):
        await phase_two_of(bank, debit)
        await phase_two_of(bank, credit)
    expected = (
        {"bank-0": (60, 0), "bank-1": (140, 0)}
        if phase_two == "commit"
        else {"bank-0": (100, 0), "bank-1": (100, 0)}
    )
    assert await bank.balances() == expected

    # And once more across another crash: phase two is not applied twice.
    await bank.crash()
    bank = await banks.restart(bank)
    await phase_two_of(bank, debit)
    await phase_two_of(bank, credit)
    assert await bank.balances() == expected
    summary = await bank.summary()
    assert (summary.total, summary.prepared_branches) == (200, 0)


async def test_restart_keeps_balances_and_does_not_reseed(
    banks: BankProcesses, tmp_path: Path
) -> None:
    bank = await banks.start(tmp_path / "bank.db", accounts=1, initial_balance=100)
    req = branch("t1", "b1", "debit", "bank-0", 25)
    req.one_phase = True
    await bank.participant.Commit(req)
    bank = await banks.restart(bank)  # same --accounts/--initial-balance arguments
    assert await bank.balances() == {"bank-0": (75, 0)}
