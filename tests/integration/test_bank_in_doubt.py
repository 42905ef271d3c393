"""In-doubt resolution (presumed abort): a bank holding branches prepared for too long
asks the coordinator named in the Prepare and applies the outcome by itself."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import accord.v1 as pb
from tests.integration._bank_helpers import (
    BankProcesses,
    FakeCoordinator,
    assert_eventually,
    branch,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def banks(tmp_path: Path) -> AsyncIterator[BankProcesses]:
    procs = BankProcesses(tmp_path)
    yield procs
    await procs.stop_all()


@pytest.fixture
async def coordinator() -> AsyncIterator[FakeCoordinator]:
    fake = await FakeCoordinator(
        {"g-commit": pb.OUTCOME_COMMITTED, "g-abort": pb.OUTCOME_ABORTED}
    ).start()
    yield fake
    await fake.stop()


async def test_in_doubt_branches_are_resolved(
    banks: BankProcesses, tmp_path: Path, coordinator: FakeCoordinator
) -> None:
    bank = await banks.start(
        tmp_path / "bank.db", accounts=2, initial_balance=100, in_doubt_after_s=0.5
    )
    at = coordinator.address
    await bank.participant.Prepare(
        branch("g-commit", "b1", "debit", "bank-0", 30, coordinator_address=at)
    )
    await bank.participant.Prepare(
        branch("g-commit", "b2", "credit", "bank-1", 30, coordinator_address=at)
    )
    await bank.participant.Prepare(
        branch("g-abort", "b1", "debit", "bank-1", 70, coordinator_address=at)
    )
    # Asked about but never decided (UNAVAILABLE): stays prepared, funds held.
    await bank.participant.Prepare(
        branch("g-unknown", "b1", "debit", "bank-0", 5, coordinator_address=at)
    )

    async def resolved() -> bool:
        return await bank.balances() == {"bank-0": (70, 5), "bank-1": (130, 0)}

    await assert_eventually(resolved, what="in-doubt resolution")
    assert {"g-commit", "g-abort", "g-unknown"} <= set(coordinator.queries)
    assert (await bank.summary()).prepared_branches == 1
    # The coordinator's own late Commit is a harmless duplicate.
    await bank.participant.Commit(branch("g-commit", "b1", "debit", "bank-0", 30))
    assert await bank.balances() == {"bank-0": (70, 5), "bank-1": (130, 0)}


async def test_resolution_after_a_crash(
    banks: BankProcesses, tmp_path: Path, coordinator: FakeCoordinator
) -> None:
    bank = await banks.start(
        tmp_path / "bank.db", accounts=1, initial_balance=100, in_doubt_after_s=0.5
    )
    at = coordinator.address
    await bank.participant.Prepare(
        branch("g-commit", "b1", "debit", "bank-0", 10, coordinator_address=at)
    )
    await bank.crash()
    bank = await banks.restart(bank)

    async def committed() -> bool:
        return await bank.balances() == {"bank-0": (90, 0)}

    await assert_eventually(committed, what="resolution after restart")
    # Resolved by asking the coordinator after the restart, not by anything else.
    assert "g-commit" in coordinator.queries
    assert (await bank.summary()).prepared_branches == 0
