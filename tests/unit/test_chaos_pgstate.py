"""A PostgreSQL bank's final state saved in the SQLite bank's layout reads back, through
the checker's own loader, as the same state."""

from __future__ import annotations

from pathlib import Path

from accord.participants import AuditRow, Outcome
from accord.tools.chaos import (
    Account,
    BarrierRow,
    BranchRow,
    LedgerEntry,
    ParticipantState,
    load_participant,
)
from accord.tools.chaos._pgstate import save_participant


def test_saved_state_reads_back_the_same(tmp_path: Path) -> None:
    state = ParticipantState(
        name="bank-1",
        path="postgresql://postgres@127.0.0.1:5432/bank_1",
        accounts={"bank-1-0": Account(id="bank-1-0", balance=990, held=0)},
        ledger=(
            LedgerEntry(
                seq=1,
                gid="g1",
                branch_id="b1",
                account="bank-1-0",
                delta=-10,
                balance_after=990,
                created_at=1.5,
            ),
        ),
        branches=(
            BranchRow(
                gid="g1",
                branch_id="b1",
                operation="debit",
                state="COMMITTED",
                prepared_at=1.0,
                updated_at=1.5,
            ),
        ),
        barrier=(
            BarrierRow(
                gid="g1", branch_id="b1", op="prepare", status="OK", message="", created_at=1.0
            ),
            BarrierRow(
                gid="g1", branch_id="b1", op="commit", status="OK", message="", created_at=1.5
            ),
        ),
        audit=(
            AuditRow(
                seq=1,
                gid="g1",
                branch_id="b1",
                op="commit",
                outcome=Outcome.COMMITTED,
                source="coordinator",
                shard="s1",
                epoch=3,
                coordinator_address="127.0.0.1:7070",
                detail="",
                at=1.5,
            ),
        ),
    )
    path = save_participant(state, tmp_path / "final" / "bank-1.db")
    back = load_participant("bank-1", path)
    assert back.accounts == state.accounts
    assert (back.ledger, back.branches, back.barrier, back.audit) == (
        state.ledger,
        state.branches,
        state.barrier,
        state.audit,
    )
    assert back.has_audit
    # Saving again replaces the file.
    save_participant(state, path)
    assert load_participant("bank-1", path).ledger == state.ledger
