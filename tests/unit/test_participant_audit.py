"""The durable audit (``accord_audit``): one row per answered call, written with the
barrier row, read offline from the file (or a copy) with :func:`read_audit`."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from accord.participants import (
    BranchCall,
    Op,
    Outcome,
    ParticipantService,
    Status,
    Store,
    copy_database,
    read_audit,
)
from accord.participants.bank import bank_app, seed_accounts


@pytest.fixture
async def bank(tmp_path: Path) -> AsyncIterator[ParticipantService]:
    svc = ParticipantService(
        bank_app("bank", seed=seed_accounts("bank", 2, 100)), Store(tmp_path / "bank.db")
    )
    await svc.open()
    yield svc
    await svc.close()


def call(
    gid: str,
    operation: str,
    amount: int = 10,
    *,
    branch: str = "b1",
    epoch: int = 2,
    one_phase: bool = False,
) -> BranchCall:
    payload = json.dumps({"account": "bank-0", "amount": amount}).encode()
    return BranchCall(
        gid=gid,
        branch_id=branch,
        operation=operation,
        payload=payload,
        shard="s1",
        epoch=epoch,
        coordinator_address="127.0.0.1:7070",
        one_phase=one_phase,
    )


def summary(path: Path) -> list[tuple[str, str, str, str, str]]:
    return [(r.gid, r.branch_id, r.op, r.outcome.value, r.source) for r in read_audit(path)]


async def test_every_answered_call_is_audited(bank: ParticipantService, tmp_path: Path) -> None:
    await bank.call(Op.PREPARE, call("g1", "debit"))
    await bank.call(Op.PREPARE, call("g1", "debit"))  # duplicate
    await bank.call(Op.COMMIT, call("g1", "debit"))
    await bank.call(Op.ABORT, call("g1", "debit"))  # conflict: already committed
    await bank.call(Op.PREPARE, call("g2", "debit", 1000))  # refused: insufficient funds
    await bank.call(Op.ABORT, call("g3", "debit"))  # abort before prepare
    await bank.call(Op.COMMIT, call("g4", "credit", one_phase=True))
    await bank.call(Op.EXECUTE, call("s1", "debit", branch="a"))
    await bank.call(Op.COMPENSATE, call("s1", "refund", branch="a"))
    await bank.call(Op.COMPENSATE, call("s1", "refund", branch="a"))  # duplicate
    await bank.call(Op.COMPENSATE, call("s1", "uncredit", branch="b"))  # before execute
    fenced = await bank.call(Op.PREPARE, call("g5", "debit", epoch=1))
    assert fenced.status is Status.FENCED
    await bank.call(Op.PREPARE, call("g6", "debit"))
    await bank.call(Op.COMMIT, call("g6", "debit", epoch=1), fence=False)  # the resolver
    db = tmp_path / "bank.db"
    assert summary(db) == [
        ("g1", "b1", "prepare", "PREPARED", "coordinator"),
        ("g1", "b1", "prepare", "DUPLICATE", "coordinator"),
        ("g1", "b1", "commit", "COMMITTED", "coordinator"),
        ("g1", "b1", "abort", "CONFLICT", "coordinator"),
        ("g2", "b1", "prepare", "REFUSED", "coordinator"),
        ("g3", "b1", "abort", "ABORTED_BEFORE_PREPARE", "coordinator"),
        ("g4", "b1", "one_phase_commit", "COMMITTED", "coordinator"),
        ("s1", "a", "execute", "EXECUTED", "coordinator"),
        ("s1", "a", "compensate", "COMPENSATED", "coordinator"),
        ("s1", "a", "compensate", "DUPLICATE", "coordinator"),
        ("s1", "b", "compensate", "NULL_COMPENSATION", "coordinator"),
        ("g5", "b1", "prepare", "FENCED", "coordinator"),
        ("g6", "b1", "prepare", "PREPARED", "coordinator"),
        ("g6", "b1", "commit", "COMMITTED", "resolver"),
    ]
    rows = read_audit(db)
    assert rows[1].detail == "OK: prepared"
    assert "insufficient funds" in rows[4].detail
    assert rows[0].shard == "s1" and rows[0].epoch == 2
    assert rows[0].coordinator_address == "127.0.0.1:7070"
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)
    assert all(a.at <= b.at for a, b in itertools.pairwise(rows))


async def test_not_yet_and_errors_leave_no_row(bank: ParticipantService, tmp_path: Path) -> None:
    await bank.call(Op.EXECUTE, call("s2", "credit", branch="c"))
    await bank.call(Op.EXECUTE, call("s3", "debit", 110, branch="d"))  # spends the credit
    # The credit cannot be taken back yet: "not yet", nothing happened, nothing audited.
    spent = await bank.call(Op.COMPENSATE, call("s2", "uncredit", branch="c"))
    assert spent.status is Status.NOT_YET
    assert [r.outcome for r in read_audit(tmp_path / "bank.db")] == [
        Outcome.EXECUTED,
        Outcome.EXECUTED,
    ]


async def test_read_audit_on_a_copy_while_running(bank: ParticipantService, tmp_path: Path) -> None:
    await bank.call(Op.PREPARE, call("g1", "debit"))
    copy = copy_database(tmp_path / "bank.db", tmp_path / "copies" / "bank.db")
    assert summary(copy) == [("g1", "b1", "prepare", "PREPARED", "coordinator")]
    await bank.call(Op.COMMIT, call("g1", "debit"))
    assert len(read_audit(tmp_path / "bank.db")) == 2
    assert len(read_audit(copy)) == 1


def test_read_audit_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_audit(tmp_path / "nope.db")
