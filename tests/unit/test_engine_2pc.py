"""2PC through the engine with a fake WAL and scripted participants (fast tier)."""

from __future__ import annotations

import asyncio

import pytest

import accord.v1 as pb
from accord.coordinator import (
    AlreadyExists,
    CoordinatorConfig,
    Engine,
    FailedPrecondition,
    InvalidArgument,
    Limits,
    NotFound,
    ResourceExhausted,
    RetryPolicy,
    TxnState,
    Unavailable,
)
from accord.coordinator._calls import CallResult, Verdict
from accord.coordinator._records import RecordType
from accord.coordinator._specs import BranchSpec
from accord.coordinator._states import Outcome
from tests.unit._fakes import FakeCalls, FakeClock, FakeWal

FAST = CoordinatorConfig(retry=RetryPolicy(initial_s=0.001, max_s=0.002), phase_two_wait_s=1.0)


def engine(
    calls: FakeCalls | None = None, config: CoordinatorConfig = FAST
) -> tuple[Engine, FakeWal, FakeCalls]:
    wal, calls = FakeWal(), calls or FakeCalls()
    return Engine(wal=wal, calls=calls, config=config, clock=FakeClock()), wal, calls


def two_branches() -> list[BranchSpec]:
    return [
        BranchSpec(service="bank-a", operation="debit", payload=b"1"),
        BranchSpec(service="bank-b", operation="credit", payload=b"1"),
    ]


def rtypes(wal: FakeWal) -> list[RecordType]:
    return [RecordType(r[1]) for r in wal.records]


async def test_all_yes_commits_with_one_forced_record() -> None:
    e, wal, calls = engine()
    txn = await e.execute(key="", timeout_ms=0, branches=two_branches())
    assert txn.state == TxnState.COMMITTED
    assert rtypes(wal) == [RecordType.PREPARE, RecordType.COMMIT, RecordType.END]
    assert [r[3] for r in wal.records] == [False, True, False]
    assert sorted(m for m, _, _ in calls.log) == ["Commit", "Commit", "Prepare", "Prepare"]


async def test_a_no_vote_aborts_and_tells_the_others() -> None:
    calls = FakeCalls({("Prepare", "b1"): [CallResult(Verdict.NO, detail="insufficient funds")]})
    e, wal, _ = engine(calls)
    txn = await e.execute(key="", timeout_ms=0, branches=two_branches())
    assert txn.state == TxnState.ABORTED
    assert "insufficient funds" in txn.reason
    assert RecordType.COMMIT not in rtypes(wal)
    aborts = [b for m, b, _ in calls.log if m == "Abort"]
    assert aborts == ["b2"]  # the refusing branch holds nothing


async def test_read_only_voter_leaves_phase_two() -> None:
    calls = FakeCalls({("Prepare", "b2"): [CallResult(Verdict.OK, read_only=True)]})
    e, wal, _ = engine(calls)
    txn = await e.execute(key="", timeout_ms=0, branches=two_branches())
    assert txn.state == TxnState.COMMITTED
    assert [b for m, b, _ in calls.log if m == "Commit"] == ["b1"]
    commit = RecordType.COMMIT.decode(wal.records[1][2])
    assert list(commit.branch_ids) == ["b1"]  # type: ignore[union-attr]


async def test_all_read_only_needs_no_decision_record() -> None:
    ro = CallResult(Verdict.OK, read_only=True)
    e, wal, _ = engine(FakeCalls({("Prepare", "b1"): [ro], ("Prepare", "b2"): [ro]}))
    txn = await e.execute(key="", timeout_ms=0, branches=two_branches())
    assert txn.state == TxnState.COMMITTED
    assert rtypes(wal) == [RecordType.PREPARE, RecordType.END]


async def test_single_branch_commits_in_one_phase() -> None:
    e, wal, calls = engine()
    txn = await e.execute(key="", timeout_ms=0, branches=two_branches()[:1])
    assert txn.state == TxnState.COMMITTED and txn.one_phase
    assert [m for m, _, _ in calls.log] == ["Commit"]
    assert rtypes(wal) == [RecordType.PREPARE, RecordType.END]


async def test_retryable_answers_are_retried() -> None:
    busy = CallResult(Verdict.RETRY, detail="UNAVAILABLE")
    calls = FakeCalls(
        {
            ("Prepare", "b1"): [busy, busy, CallResult(Verdict.OK)],
            ("Commit", "b2"): [busy, CallResult(Verdict.OK)],
        }
    )
    e, _, _ = engine(calls)
    txn = await e.execute(key="", timeout_ms=0, branches=two_branches())
    assert txn.state == TxnState.COMMITTED
    assert txn.branches[0].attempts == 4  # 3 prepares + 1 commit
    assert txn.branches[1].attempts == 3


async def test_prepare_that_never_answers_aborts_at_the_deadline() -> None:
    busy = CallResult(Verdict.RETRY, detail="UNAVAILABLE")
    clock = FakeClock()

    class SlowCalls(FakeCalls):
        async def call(
            self,
            method: str,
            address: str,
            request: pb.BranchRequest,
            attempt_s: float,
            **_kw: object,
        ) -> CallResult:
            clock.now += 100  # every attempt costs 100 ms of the deadline
            return await super().call(method, address, request, attempt_s)

    calls = SlowCalls({("Prepare", "b1"): [busy]})
    e = Engine(wal=FakeWal(), calls=calls, config=FAST, clock=clock)
    txn = await e.execute(key="", timeout_ms=1000, branches=two_branches())
    assert txn.state == TxnState.ABORTED
    assert "deadline" in txn.reason


async def test_interactive_begin_enlist_commit() -> None:
    e, wal, _ = engine()
    txn = await e.begin(key="k1", timeout_ms=5000)
    assert txn.state == TxnState.ACTIVE
    b1 = await e.enlist(txn.gid, two_branches()[0])
    b2 = await e.enlist(txn.gid, two_branches()[1])
    assert (b1, b2) == ("b1", "b2")
    assert (
        await e.enlist(
            txn.gid, BranchSpec(service="bank-a", operation="debit", payload=b"1", branch_id="b1")
        )
        == "b1"
    )
    with pytest.raises(AlreadyExists):
        await e.enlist(
            txn.gid, BranchSpec(service="bank-a", operation="debit", payload=b"2", branch_id="b1")
        )
    done = await e.commit(txn.gid)
    assert done.state == TxnState.COMMITTED
    assert (await e.commit(txn.gid)).state == TxnState.COMMITTED  # retried Commit: same outcome
    with pytest.raises(FailedPrecondition):
        await e.enlist(txn.gid, two_branches()[0])
    with pytest.raises(FailedPrecondition):
        await e.abort(txn.gid, "")
    assert rtypes(wal)[0] == RecordType.BEGIN


async def test_interactive_transaction_expires() -> None:
    e, _, _calls = engine()
    txn = await e.begin(key="", timeout_ms=20)
    await e.enlist(txn.gid, two_branches()[0])
    await asyncio.wait_for(txn.finished.wait(), 2)
    assert txn.state == TxnState.ABORTED and "deadline" in txn.reason
    with pytest.raises(FailedPrecondition):
        await e.enlist(txn.gid, two_branches()[1])


async def test_client_abort_while_active() -> None:
    e, _, calls = engine()
    txn = await e.begin(key="", timeout_ms=0)
    await e.enlist(txn.gid, two_branches()[0])
    out = await e.abort(txn.gid, "changed my mind")
    assert out.state == TxnState.ABORTED and out.reason == "changed my mind"
    assert calls.log == []  # nobody had heard of it


async def test_idempotency_keys() -> None:
    e, wal, _calls = engine()
    first = await e.execute(key="order-1", timeout_ms=0, branches=two_branches())
    n = len(wal.records)
    again = await e.execute(key="order-1", timeout_ms=0, branches=two_branches())
    assert again is first and len(wal.records) == n
    with pytest.raises(AlreadyExists):
        await e.execute(key="order-1", timeout_ms=0, branches=two_branches()[:1])
    t = await e.begin(key="b-1", timeout_ms=1000)
    assert (await e.begin(key="b-1", timeout_ms=1000)) is t
    with pytest.raises(AlreadyExists):
        await e.begin(key="b-1", timeout_ms=2000)


@pytest.mark.parametrize(
    ("branches", "message"),
    [
        ([], "at least one"),
        ([BranchSpec(operation="x")], "exactly one of service and address"),
        ([BranchSpec(service="a", address="h:1", operation="x")], "exactly one"),
        ([BranchSpec(service="a")], "operation is required"),
        ([BranchSpec(service="a b", operation="x")], "not a valid service"),
        ([BranchSpec(address="nohost", operation="x")], "host:port"),
        ([BranchSpec(address="h:70000", operation="x")], "host:port"),
        ([BranchSpec(service="a", operation="x", branch_id="bad id")], "branch_id"),
        ([BranchSpec(service="a", operation="x", payload=b"x" * (256 * 1024 + 1))], "payload"),
        ([BranchSpec(service="a", operation="x", branch_id="d")] * 2, "duplicate"),
        ([BranchSpec(service="a", operation="x")] * 65, "limit"),
    ],
)
async def test_malformed_execute_is_refused_and_nothing_is_logged(
    branches: list[BranchSpec], message: str
) -> None:
    e, wal, calls = engine()
    with pytest.raises(InvalidArgument, match=message):
        await e.execute(key="", timeout_ms=0, branches=branches)
    assert wal.records == [] and calls.log == [] and e.inflight == 0


async def test_unknown_service_is_unavailable_and_nothing_is_kept() -> None:
    e, wal, _ = engine()
    with pytest.raises(Unavailable, match="nowhere"):
        await e.execute(
            key="", timeout_ms=0, branches=[BranchSpec(service="nowhere", operation="x")]
        )
    assert wal.records == [] and e.inflight == 0


async def test_limits() -> None:
    cfg = CoordinatorConfig(limits=Limits(max_inflight=1, max_branches=1))
    e, _, _ = engine(config=cfg)
    t = await e.begin(key="", timeout_ms=0)
    with pytest.raises(ResourceExhausted):
        await e.begin(key="", timeout_ms=0)
    await e.enlist(t.gid, two_branches()[0])
    with pytest.raises(ResourceExhausted):
        await e.enlist(t.gid, two_branches()[1])
    with pytest.raises(InvalidArgument):
        await e.begin(key="", timeout_ms=10**9)
    with pytest.raises(NotFound):
        e.get("nope")


async def test_query_outcome() -> None:
    e, _, _ = engine()
    t = await e.execute(key="", timeout_ms=0, branches=two_branches())
    assert e.query_outcome(t.gid) == Outcome.COMMITTED
    assert e.query_outcome("never-heard-of-it") == Outcome.ABORTED
    a = await e.begin(key="", timeout_ms=0)
    assert e.query_outcome(a.gid) == Outcome.IN_PROGRESS


async def _replayed(wal: FakeWal, calls: FakeCalls, upto: int) -> Engine:
    e2 = Engine(wal=FakeWal(), calls=calls, config=FAST, clock=FakeClock())
    e2.replay(None, [(lsn, rt, p) for lsn, rt, p, _ in wal.records[:upto]])
    await e2.resume()
    for t in list(e2.table.all()):
        await asyncio.wait_for(t.finished.wait(), 2)
    return e2


async def test_recovery_finishes_a_committing_transaction() -> None:
    e, wal, _ = engine()
    txn = await e.execute(key="k", timeout_ms=0, branches=two_branches())
    calls = FakeCalls()
    e2 = await _replayed(wal, calls, upto=2)  # PREPARE + COMMIT, no END
    t2 = e2.get(txn.gid)
    assert t2.state == TxnState.COMMITTED
    assert sorted(m for m, _, _ in calls.log) == ["Commit", "Commit"]
    assert e2.table.gid_for_key("k") == txn.gid  # idempotency key survives


async def test_recovery_aborts_an_undecided_transaction() -> None:
    e, wal, _ = engine()
    txn = await e.execute(key="", timeout_ms=0, branches=two_branches())
    calls = FakeCalls()
    e2 = await _replayed(wal, calls, upto=1)  # PREPARE only: presumed abort
    assert e2.get(txn.gid).state == TxnState.ABORTED
    assert sorted(m for m, _, _ in calls.log) == ["Abort", "Abort"]


async def test_recovery_resends_a_one_phase_commit() -> None:
    e, wal, _ = engine()
    txn = await e.execute(key="", timeout_ms=0, branches=two_branches()[:1])
    calls = FakeCalls()
    e2 = await _replayed(wal, calls, upto=1)
    assert e2.get(txn.gid).state == TxnState.COMMITTED
    assert [m for m, _, _ in calls.log] == ["Commit"]


async def test_recovery_aborts_an_active_transaction_and_leaves_finished_ones() -> None:
    e, wal, _ = engine()
    active = await e.begin(key="", timeout_ms=0)
    done = await e.execute(key="", timeout_ms=0, branches=two_branches())
    calls = FakeCalls()
    e2 = await _replayed(wal, calls, upto=len(wal.records))
    assert e2.get(active.gid).state == TxnState.ABORTED
    assert e2.get(done.gid).state == TxnState.COMMITTED
    assert calls.log == []


async def test_checkpoint_image_rebuilds_the_same_transactions() -> None:
    cfg = CoordinatorConfig(checkpoint_every=5, retry=FAST.retry)
    e, wal, _ = engine(config=cfg)
    gids = [
        (await e.execute(key=f"k{i}", timeout_ms=0, branches=two_branches())).gid for i in range(4)
    ]
    await asyncio.sleep(0)
    assert wal.checkpoints, "a checkpoint should have been taken"
    image, lsn = wal.checkpoints[-1]
    e2 = Engine(wal=FakeWal(), calls=FakeCalls(), config=FAST, clock=FakeClock())
    e2.replay(image, [(n, rt, p) for n, rt, p, _ in wal.records if n > lsn])
    await e2.resume()
    for g in gids:
        assert e2.get(g).state == TxnState.COMMITTED
    assert set(e2.table.keys()) == {"k0", "k1", "k2", "k3"}


async def test_a_long_replay_gives_the_event_loop_turns_and_rebuilds_the_same_state() -> None:
    e, wal, _ = engine()
    done = [await e.execute(key=f"k{i}", timeout_ms=0, branches=two_branches()) for i in range(6)]
    active = await e.begin(key="", timeout_ms=0)
    records = [(lsn, rt, p) for lsn, rt, p, _ in wal.records]
    assert len(records) > 12

    at_once = Engine(wal=FakeWal(), calls=FakeCalls(), config=FAST, clock=FakeClock())
    at_once.replay(None, records)
    chunked = Engine(wal=FakeWal(), calls=FakeCalls(), config=FAST, clock=FakeClock())
    turns = 0

    async def keepalive() -> None:  # stands for the shard lease's keepalive task
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    beat = asyncio.create_task(keepalive())
    await asyncio.sleep(0)
    before = turns
    await chunked.replay_yielding(None, records, every=4)
    beat.cancel()
    # The other task ran between chunks: at least once per 4 records.
    assert turns - before >= len(records) // 4
    for txn in [*done, active]:
        assert chunked.get(txn.gid).to_pb() == at_once.get(txn.gid).to_pb()
        assert chunked.get(txn.gid).state == at_once.get(txn.gid).state
    assert chunked.get(done[0].gid).key == "k0"
