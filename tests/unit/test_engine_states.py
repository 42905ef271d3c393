"""The state table: every allowed and every forbidden transition, and the order
check -> log -> durable -> memory."""

from __future__ import annotations

import asyncio
import itertools

import pytest

import accord.v1 as pb
from accord.coordinator import TRANSITIONS, CoordinatorConfig, Engine, IllegalTransition, TxnState
from accord.coordinator._model import BranchRt, Txn
from accord.coordinator._records import RecordType
from tests.unit._fakes import FakeCalls, FakeClock, FakeWal

ALL_PAIRS = list(itertools.product(TxnState, TxnState))
SAGA_STATES = {
    TxnState.RUNNING,
    TxnState.COMPENSATING,
    TxnState.COMPLETED,
    TxnState.COMPENSATED,
    TxnState.STUCK,
}
EXPECTED_RECORD = {
    TxnState.PREPARING: (RecordType.PREPARE, False),
    TxnState.COMMITTING: (RecordType.COMMIT, True),  # the only forced record
    TxnState.ABORTING: (RecordType.ABORT, False),
    TxnState.COMMITTED: (RecordType.END, False),
    TxnState.ABORTED: (RecordType.END, False),
}


def make_engine(wal: FakeWal | None = None) -> tuple[Engine, FakeWal]:
    wal = wal or FakeWal()
    return Engine(wal=wal, calls=FakeCalls(), config=CoordinatorConfig(), clock=FakeClock()), wal


def txn_in(state: TxnState) -> Txn:
    protocol = pb.PROTOCOL_SAGA if state in SAGA_STATES else pb.PROTOCOL_TWO_PHASE_COMMIT
    t = Txn(gid="g1", state=state, claimed=state, protocol=protocol)
    t.branches = [BranchRt(branch_id="b1", service="s", address="", operation="op", payload=b"")]
    return t


def test_table_is_what_the_protocol_needs() -> None:
    assert set(TRANSITIONS) == {
        (TxnState.ACTIVE, TxnState.PREPARING),
        (TxnState.ACTIVE, TxnState.ABORTING),
        (TxnState.PREPARING, TxnState.COMMITTING),
        (TxnState.PREPARING, TxnState.ABORTING),
        (TxnState.PREPARING, TxnState.COMMITTED),
        (TxnState.PREPARING, TxnState.ABORTED),
        (TxnState.COMMITTING, TxnState.COMMITTED),
        (TxnState.ABORTING, TxnState.ABORTED),
        (TxnState.RUNNING, TxnState.COMPLETED),
        (TxnState.RUNNING, TxnState.COMPENSATING),
        (TxnState.COMPENSATING, TxnState.COMPENSATED),
        (TxnState.COMPENSATING, TxnState.STUCK),
        (TxnState.STUCK, TxnState.COMPENSATING),
    }
    # Nothing leaves a final state, and no decision is ever reversed.
    for old, new in TRANSITIONS:
        assert not old.final
        assert (old, new) != (TxnState.COMMITTING, TxnState.ABORTING)
        assert (old, new) != (TxnState.ABORTING, TxnState.COMMITTING)


@pytest.mark.parametrize(
    ("old", "new"), ALL_PAIRS, ids=[f"{a.name}->{b.name}" for a, b in ALL_PAIRS]
)
async def test_transition(old: TxnState, new: TxnState) -> None:
    engine, wal = make_engine()
    txn = txn_in(old)
    engine.table.admit(txn)
    if (old, new) in TRANSITIONS:
        lsn = await engine.transition(txn, new, reason="r", commit_branches=["b1"])
        assert txn.state == new and txn.claimed == new and txn.lsn == lsn
        (_, rtype, payload, sync) = wal.records[-1]
        if old in SAGA_STATES:
            # A saga's state changes are forced: the decision to compensate, and every
            # outcome a client is told (its step records ride the group commit).
            assert (RecordType(rtype), sync) == (RecordType.SAGA_STATE, True)
        else:
            assert (RecordType(rtype), sync) == EXPECTED_RECORD[new]
        decoded = RecordType(rtype).decode(payload)
        assert decoded.gid == "g1"
        assert txn.decided.is_set() == new.decided  # STUCK counts: a client waits for it
        assert txn.finished.is_set() == new.final
    else:
        with pytest.raises(IllegalTransition):
            await engine.transition(txn, new)
        assert wal.records == []  # nothing logged
        assert txn.state == old and txn.claimed == old


async def test_memory_changes_only_after_durability() -> None:
    engine, wal = make_engine(FakeWal(auto=False))
    txn = txn_in(TxnState.PREPARING)
    engine.table.admit(txn)
    task = asyncio.create_task(engine.transition(txn, TxnState.COMMITTING, commit_branches=["b1"]))
    await asyncio.sleep(0)
    assert len(wal.records) == 1 and wal.records[0][3] is True  # logged, forced
    assert txn.state == TxnState.PREPARING  # not applied yet
    assert not txn.decided.is_set()
    # A competing transition sees the claimed state and is refused.
    with pytest.raises(IllegalTransition):
        await engine.transition(txn, TxnState.ABORTING)
    wal.release()
    await task
    state: TxnState = txn.state
    assert state == TxnState.COMMITTING and txn.decided.is_set()


async def test_failed_append_leaves_state_unchanged() -> None:
    class BrokenWal(FakeWal):
        def submit(
            self, rtype: int, payload: bytes, *, sync: bool
        ) -> tuple[int, asyncio.Future[None]]:
            raise OSError("disk on fire")

    engine, _ = make_engine(BrokenWal())
    txn = txn_in(TxnState.PREPARING)
    from accord.coordinator import Unavailable

    with pytest.raises(Unavailable):
        await engine.transition(txn, TxnState.COMMITTING)
    assert txn.state == txn.claimed == TxnState.PREPARING


async def test_watchers_hear_each_durable_change_with_its_lsn() -> None:
    engine, _ = make_engine()
    txn = txn_in(TxnState.PREPARING)
    engine.table.admit(txn)
    events: list[pb.TransactionEvent] = []

    async def watch() -> None:
        async for ev in engine.watch("g1"):
            events.append(ev)

    w = asyncio.create_task(watch())
    await asyncio.sleep(0)
    await engine.transition(txn, TxnState.COMMITTING, commit_branches=["b1"])
    await engine.transition(txn, TxnState.COMMITTED)
    await asyncio.wait_for(w, 1)
    assert [TxnState(e.state) for e in events] == [
        TxnState.PREPARING,
        TxnState.COMMITTING,
        TxnState.COMMITTED,
    ]
    assert events[1].lsn < events[2].lsn
