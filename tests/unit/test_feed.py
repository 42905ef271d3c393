"""The event feed (coordinator/_feed.py) with the real WAL in a temp dir: record ->
event conversion, the hub's live path, bounded buffers and catch-up from disk, resume,
snapshots after a checkpoint removed segments, and request validation."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

import accord.v1 as pb
from accord.coordinator import CoordinatorConfig, Engine, InvalidArgument, RetryPolicy, TxnState
from accord.coordinator._calls import CallResult, Verdict
from accord.coordinator._feed import (
    MAX_RESPONSE_BYTES,
    FeedHub,
    OutOfRange,
    chunks,
    record_event,
    trace_id_of,
)
from accord.coordinator._records import RecordType
from accord.coordinator._specs import BranchSpec, SagaSpec, StepRetry, StepSpec
from accord.coordinator._telemetry import CoordinatorTelemetry
from accord.coordinator.wal import WAL, LogReader, RecordsGone, WalError
from accord.coordinator.wal._reader import segments_of
from tests.unit._fakes import FakeCalls

K = pb.FeedEventKind
FAST = CoordinatorConfig(
    shard="s1", retry=RetryPolicy(initial_s=0.001, max_s=0.002), phase_two_wait_s=2.0
)
OK = CallResult(Verdict.OK)
NO = CallResult(Verdict.NO, detail="no")
FAST_RETRY = StepRetry(initial_interval_ms=1, max_interval_ms=2, max_attempts=2)


class Tally(CoordinatorTelemetry):
    """Counts the feed's metric calls."""

    def __init__(self) -> None:
        super().__init__()
        self.catch_ups: Counter[str] = Counter()
        self.sent = 0
        self.subscribed = 0

    def feed_catch_up(self, why: str) -> None:
        self.catch_ups[why] += 1

    def feed_sent(self, events: int) -> None:
        self.sent += events

    def feed_subscribed(self, delta: int) -> None:
        self.subscribed += delta


async def open_wal(tmp: Path, hub: FeedHub, segment: int = 64 * 1024) -> WAL:
    wal, _ = await WAL.open(tmp, segment_size=segment, feed=hub)
    return wal


def begin(i: int) -> bytes:
    return pb.WalBegin(gid=f"g{i:04d}", unix_ms=1000 + i).SerializeToString()


async def take(
    hub: FeedHub,
    from_lsn: int,
    *,
    until: int | None = None,
    count: int | None = None,
    max_batch: int = 0,
    timeout_s: float = 10.0,
) -> list[pb.FeedEvent]:
    """Events from ``from_lsn`` until one at or past ``until`` (or ``count`` of them)."""
    out: list[pb.FeedEvent] = []
    async with asyncio.timeout(timeout_s):
        async with contextlib.aclosing(hub.stream(from_lsn, max_batch)) as stream:
            first = True
            async for resp in stream:
                if first:  # the handshake: the shard, no events
                    assert resp.shard == hub.shard and not resp.events, resp
                    first = False
                    continue
                assert not resp.shard
                assert max_batch == 0 or len(resp.events) <= max_batch
                assert not resp.events or resp.durable_lsn >= resp.events[-1].lsn
                out.extend(resp.events)
                if count is not None and len(out) >= count:
                    return out[:count]
                if until is not None and out and out[-1].lsn >= until:
                    return out
    return out


def lsns(events: Sequence[pb.FeedEvent]) -> list[int]:
    return [e.lsn for e in events]


# --------------------------------------------------------------------- conversion


def test_records_become_events() -> None:
    tp = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    assert trace_id_of(tp) == "ab" * 16 and trace_id_of("") == ""
    prep = pb.WalPrepare(
        gid="g",
        idempotency_key="k",
        created_unix_ms=5,
        deadline_unix_ms=9,
        branches=[pb.Branch(service="a", operation="x", branch_id="b1")],
        resolved_addresses=["h:1"],
        one_phase=True,
        traceparent=tp,
        unix_ms=7,
    )
    e = record_event("s1", 3, RecordType.PREPARE, prep.SerializeToString())
    assert e is not None
    assert (e.shard, e.lsn, e.kind, e.state) == (
        "s1",
        3,
        K.FEED_EVENT_KIND_PREPARING,
        pb.TXN_STATE_PREPARING,
    )
    assert (e.protocol, e.unix_ms, e.trace_id, e.one_phase) == (
        pb.PROTOCOL_TWO_PHASE_COMMIT,
        7,
        "ab" * 16,
        True,
    )
    assert e.branches[0].branch.branch_id == "b1" and e.branches[0].resolved_address == "h:1"
    assert e.branches[0].state == pb.BRANCH_STATE_PENDING
    cases = [
        (RecordType.BEGIN, pb.WalBegin(gid="g"), K.FEED_EVENT_KIND_BEGUN, pb.TXN_STATE_ACTIVE),
        (
            RecordType.COMMIT,
            pb.WalCommit(gid="g", branch_ids=["b1"]),
            K.FEED_EVENT_KIND_COMMIT,
            pb.TXN_STATE_COMMITTING,
        ),
        (
            RecordType.ABORT,
            pb.WalAbort(gid="g", reason="r"),
            K.FEED_EVENT_KIND_ABORT,
            pb.TXN_STATE_ABORTING,
        ),
        (
            RecordType.END,
            pb.WalEnd(gid="g", state=pb.TXN_STATE_ABORTED),
            K.FEED_EVENT_KIND_ENDED,
            pb.TXN_STATE_ABORTED,
        ),
        (
            RecordType.SAGA_START,
            pb.WalSagaStart(gid="g"),
            K.FEED_EVENT_KIND_SAGA_STARTED,
            pb.TXN_STATE_RUNNING,
        ),
        (
            RecordType.SAGA_STEP,
            pb.WalSagaStep(gid="g", step=1, state=pb.BRANCH_STATE_SUCCEEDED),
            K.FEED_EVENT_KIND_STEP,
            pb.TXN_STATE_RUNNING,
        ),
        (
            RecordType.SAGA_STEP,
            pb.WalSagaStep(gid="g", step=1, state=pb.BRANCH_STATE_COMPENSATED),
            K.FEED_EVENT_KIND_STEP,
            pb.TXN_STATE_COMPENSATING,
        ),
        (  # the record says the saga's state (an undelivered step found while compensating)
            RecordType.SAGA_STEP,
            pb.WalSagaStep(
                gid="g",
                step=1,
                state=pb.BRANCH_STATE_UNDELIVERED,
                saga_state=pb.TXN_STATE_COMPENSATING,
            ),
            K.FEED_EVENT_KIND_STEP,
            pb.TXN_STATE_COMPENSATING,
        ),
        (
            RecordType.SAGA_STATE,
            pb.WalSagaState(gid="g", state=pb.TXN_STATE_STUCK),
            K.FEED_EVENT_KIND_SAGA_STATE,
            pb.TXN_STATE_STUCK,
        ),
    ]
    for rtype, rec, kind, state in cases:
        ev = record_event("s1", 1, rtype, rec.SerializeToString())
        assert ev is not None and (ev.kind, ev.state, ev.gid) == (kind, state, "g"), rtype
    assert record_event("s1", 1, 1, b"\0" * 24) is None  # the WAL's CHECKPOINT record


def test_responses_are_bounded_in_events_and_bytes() -> None:
    small = [pb.FeedEvent(lsn=i, gid="g") for i in range(10)]
    assert [len(c) for c in chunks(small, 4)] == [4, 4, 2]
    big = [pb.FeedEvent(lsn=i, reason="x" * 400_000) for i in range(6)]
    runs = chunks(big, 512)
    assert [len(c) for c in runs] == [2, 2, 2]
    assert all(sum(e.ByteSize() for e in c) <= MAX_RESPONSE_BYTES for c in runs)
    huge = [pb.FeedEvent(lsn=1, reason="x" * 2_000_000), pb.FeedEvent(lsn=2)]
    assert [len(c) for c in chunks(huge, 512)] == [1, 1]  # one event alone, never split


# --------------------------------------------------------------------- through the engine


async def engine_with_feed(
    tmp: Path, calls: FakeCalls, *, segment: int = 64 * 1024, config: CoordinatorConfig = FAST
) -> tuple[WAL, Engine, FeedHub]:
    hub = FeedHub("s1", tmp)
    wal = await open_wal(tmp, hub, segment)
    return wal, Engine(wal=wal, calls=calls, config=config), hub


def two() -> list[BranchSpec]:
    return [
        BranchSpec(service="bank-a", operation="debit", payload=b"1"),
        BranchSpec(service="bank-b", operation="credit", payload=b"1"),
    ]


def story(events: Sequence[pb.FeedEvent], gid: str) -> list[tuple[int, int]]:
    return [(e.kind, e.state) for e in events if e.gid == gid]


async def test_every_2pc_shape_arrives_in_lsn_order(tmp_path: Path) -> None:
    ro = CallResult(Verdict.OK, read_only=True)
    calls = FakeCalls({("Prepare", "no"): [NO], ("Prepare", "r1"): [ro], ("Prepare", "r2"): [ro]})
    wal, e, hub = await engine_with_feed(tmp_path, calls)
    feed = asyncio.create_task(take(hub, 0, count=13))
    await asyncio.sleep(0.05)
    committed = await e.execute(key="k1", timeout_ms=0, branches=two())
    refused = await e.execute(
        key="", timeout_ms=0, branches=[two()[0], replace(two()[1], branch_id="no")]
    )
    one = await e.execute(key="", timeout_ms=0, branches=two()[:1])
    read_only = await e.execute(
        key="",
        timeout_ms=0,
        branches=[replace(b, branch_id=f"r{i + 1}") for i, b in enumerate(two())],
    )
    interactive = await e.begin(key="", timeout_ms=60_000)
    aborted = await e.abort(interactive.gid, "changed my mind")
    events = await feed
    assert lsns(events) == sorted(lsns(events)) and len(set(lsns(events))) == len(events)
    assert all(ev.unix_ms > 0 and ev.shard == "s1" for ev in events)
    prep, commit, end = (
        K.FEED_EVENT_KIND_PREPARING,
        K.FEED_EVENT_KIND_COMMIT,
        K.FEED_EVENT_KIND_ENDED,
    )
    S = pb
    assert story(events, committed.gid) == [
        (prep, S.TXN_STATE_PREPARING),
        (commit, S.TXN_STATE_COMMITTING),
        (end, S.TXN_STATE_COMMITTED),
    ]
    assert story(events, refused.gid) == [
        (prep, S.TXN_STATE_PREPARING),
        (K.FEED_EVENT_KIND_ABORT, S.TXN_STATE_ABORTING),
        (end, S.TXN_STATE_ABORTED),
    ]
    assert story(events, one.gid) == [(prep, S.TXN_STATE_PREPARING), (end, S.TXN_STATE_COMMITTED)]
    assert story(events, read_only.gid) == [
        (prep, S.TXN_STATE_PREPARING),
        (end, S.TXN_STATE_COMMITTED),
    ]
    assert story(events, aborted.gid) == [
        (K.FEED_EVENT_KIND_BEGUN, S.TXN_STATE_ACTIVE),
        (K.FEED_EVENT_KIND_ABORT, S.TXN_STATE_ABORTING),
        (end, S.TXN_STATE_ABORTED),
    ]
    ends = {ev.gid: ev for ev in events if ev.kind == end}
    outcome = {b.branch.branch_id: b.state for b in ends[refused.gid].branches}
    assert outcome == {"b1": S.BRANCH_STATE_ABORTED, "no": S.BRANCH_STATE_REFUSED}
    outcome = {b.branch.branch_id: b.state for b in ends[read_only.gid].branches}
    assert outcome == {"r1": S.BRANCH_STATE_READ_ONLY, "r2": S.BRANCH_STATE_READ_ONLY}
    assert [b.attempts for b in ends[committed.gid].branches] == [2, 2]
    first = next(ev for ev in events if ev.gid == committed.gid)
    assert first.idempotency_key == "k1" and len(first.branches) == 2
    assert next(ev for ev in events if ev.gid == one.gid).one_phase
    await wal.close()


def saga_step(name: str, *deps: str) -> StepSpec:
    return StepSpec(
        name=name,
        service="svc",
        action="do",
        compensation="undo",
        payload=name.encode(),
        depends_on=deps,
        retry=FAST_RETRY,
    )


async def test_saga_steps_and_compensations(tmp_path: Path) -> None:
    calls = FakeCalls({("Execute", "c"): [NO]})
    wal, e, hub = await engine_with_feed(tmp_path, calls)
    feed = asyncio.create_task(take(hub, 0, count=4 + 13))
    await asyncio.sleep(0.05)
    done = await e.start_saga(
        key="", timeout_ms=0, definition=SagaSpec(steps=(saga_step("a"),)), wait=True
    )
    back = await e.start_saga(
        key="",
        timeout_ms=0,
        definition=SagaSpec(steps=(saga_step("a"), saga_step("b", "a"), saga_step("c", "b"))),
        wait=True,
    )
    assert done.state == TxnState.COMPLETED and back.state == TxnState.COMPENSATED
    events = await feed
    assert lsns(events) == sorted(lsns(events))
    step, state = K.FEED_EVENT_KIND_STEP, K.FEED_EVENT_KIND_SAGA_STATE
    assert [(ev.kind, ev.state, ev.step_status.state) for ev in events if ev.gid == done.gid] == [
        (K.FEED_EVENT_KIND_SAGA_STARTED, pb.TXN_STATE_RUNNING, 0),
        (step, pb.TXN_STATE_RUNNING, pb.BRANCH_STATE_RUNNING),
        (step, pb.TXN_STATE_RUNNING, pb.BRANCH_STATE_SUCCEEDED),
        (state, pb.TXN_STATE_COMPLETED, 0),
    ]
    mine = [ev for ev in events if ev.gid == back.gid]
    assert mine[0].kind == K.FEED_EVENT_KIND_SAGA_STARTED
    assert len(mine[0].definition.steps) == 3
    assert [(ev.kind, ev.state) for ev in mine if ev.kind == state] == [
        (state, pb.TXN_STATE_COMPENSATING),
        (state, pb.TXN_STATE_COMPENSATED),
    ]
    steps = [(ev.step, ev.step_status.state, ev.state) for ev in mine if ev.kind == step]
    assert (2, pb.BRANCH_STATE_FAILED, pb.TXN_STATE_RUNNING) in steps
    # b (step 1) is undone before a (step 0): reverse dependency order.
    undone = [s for s, st, _ in steps if st == pb.BRANCH_STATE_COMPENSATED]
    assert undone == [1, 0]
    # A compensated step says how many compensation calls it took (its action's
    # attempts stay in attempts).
    comp = [ev.step_status for ev in mine if ev.step_status.state == pb.BRANCH_STATE_COMPENSATED]
    assert [(st.attempts, st.compensation_attempts) for st in comp] == [(1, 1), (1, 1)]
    assert all(
        saga == pb.TXN_STATE_COMPENSATING
        for _, st, saga in steps
        if st in (pb.BRANCH_STATE_COMPENSATING, pb.BRANCH_STATE_COMPENSATED)
    )
    await wal.close()


# --------------------------------------------------------------------- the hub


async def test_only_durable_records_are_sent(tmp_path: Path) -> None:
    hub = FeedHub("s1", tmp_path)
    wal = await open_wal(tmp_path, hub)
    feed = asyncio.create_task(take(hub, 0, until=2))
    await asyncio.sleep(0.02)
    lsn = await wal.append(RecordType.BEGIN, begin(1), sync=False)  # written, not synced
    assert hub.durable_lsn < lsn
    assert not feed.done()
    # A subscriber waits: the idle tail is synced soon, then sent.
    await wal.append(RecordType.BEGIN, begin(2), sync=False)
    events = await feed
    assert lsns(events) == [1, 2] and hub.durable_lsn == 2
    await wal.close()


async def test_a_slow_subscriber_catches_up_from_disk(tmp_path: Path) -> None:
    tally = Tally()
    hub = FeedHub("s1", tmp_path, telemetry=tally, max_batches=2, max_events=8)
    wal = await open_wal(tmp_path, hub, segment=4096)  # many segments
    stream = hub.stream(0, 3)
    hello = await anext(stream)  # the handshake
    assert hello.shard == "s1" and not hello.events and hello.durable_lsn == 0
    pending = asyncio.ensure_future(anext(stream))  # at the live edge: joins the live path
    await asyncio.sleep(0.02)
    await wal.append(RecordType.BEGIN, begin(0), sync=True)
    first = await asyncio.wait_for(pending, 5)
    assert lsns(first.events) == [1]
    # The subscriber reads nothing while 200 records are committed, batch by batch:
    # the writer never waits for it.
    for i in range(1, 201):
        await wal.append(RecordType.BEGIN, begin(i), sync=True)
    assert tally.catch_ups["overflow"] >= 1
    got: list[pb.FeedEvent] = []
    async with asyncio.timeout(10):
        async for resp in stream:
            assert len(resp.events) <= 3
            got.extend(resp.events)
            if got[-1].lsn >= 201:
                break
    assert lsns(got) == list(range(2, 202))  # no loss, no duplicate, in order
    assert [ev.gid for ev in got] == [f"g{i:04d}" for i in range(1, 201)]
    # Back at the live edge: new records come through the live path.
    await wal.append(RecordType.BEGIN, begin(201), sync=True)
    nxt = await asyncio.wait_for(anext(stream), 5)
    assert lsns(nxt.events) == [202]
    await stream.aclose()
    assert tally.subscribed == 0 and hub.subscribers == 0
    await wal.close()


async def test_waiting_live_batches_go_out_as_one_response(tmp_path: Path) -> None:
    hub = FeedHub("s1", tmp_path)
    wal = await open_wal(tmp_path, hub)
    stream = hub.stream(0, 4)
    assert (await anext(stream)).shard == "s1"  # the handshake
    pending = asyncio.ensure_future(anext(stream))  # live, at the edge
    await asyncio.sleep(0.02)
    await wal.append(RecordType.BEGIN, begin(1), sync=True)
    assert lsns((await asyncio.wait_for(pending, 5)).events) == [1]
    for i in range(2, 8):  # six group commits while the subscriber does not read
        await wal.append(RecordType.BEGIN, begin(i), sync=True)
    got = [lsns((await asyncio.wait_for(anext(stream), 5)).events) for _ in range(2)]
    assert got == [[2, 3, 4, 5], [6, 7]]  # merged, at most max_batch each, in order
    await stream.aclose()
    await wal.close()


@pytest.mark.parametrize("n", [0, 1, 2, 7, 33, 59])
async def test_resume_after_n_events_loses_nothing(tmp_path: Path, n: int) -> None:
    hub = FeedHub("s1", tmp_path)
    wal = await open_wal(tmp_path, hub, segment=2048)
    await asyncio.gather(
        *(wal.append(RecordType.BEGIN, begin(i), sync=i % 3 == 0) for i in range(60))
    )
    await wal.append(RecordType.BEGIN, begin(60), sync=True)
    whole = await take(hub, 0, until=61)
    assert lsns(whole) == list(range(1, 62))
    part = await take(hub, 0, count=n) if n else []
    resume = part[-1].lsn if part else 0
    rest = await take(hub, resume, until=61, max_batch=5)
    assert all(ev.lsn > resume for ev in rest)
    union = {ev.lsn: ev for ev in [*part, *rest]}
    assert sorted(union) == lsns(whole)
    assert [union[k] for k in sorted(union)] == whole
    await wal.close()


async def test_validation(tmp_path: Path) -> None:
    hub = FeedHub("s1", tmp_path)
    wal = await open_wal(tmp_path, hub)
    await wal.append(RecordType.BEGIN, begin(1), sync=True)
    with pytest.raises(InvalidArgument):
        await anext(hub.stream(0, 4097))
    with pytest.raises(OutOfRange):
        await anext(hub.stream(2, 0))
    assert lsns(await take(hub, 0, until=1, max_batch=4096)) == [1]
    await wal.close()


async def test_close_ends_the_streams(tmp_path: Path) -> None:
    hub = FeedHub("s1", tmp_path)
    wal = await open_wal(tmp_path, hub)
    feed = asyncio.create_task(take(hub, 0, until=99))
    await asyncio.sleep(0.05)
    hub.close()
    assert await asyncio.wait_for(feed, 5) == []
    await wal.close()


async def test_reader_reports_removed_records(tmp_path: Path) -> None:
    hub = FeedHub("s1", tmp_path)
    wal = await open_wal(tmp_path, hub, segment=1024)
    for i in range(40):
        await wal.append(RecordType.BEGIN, begin(i), sync=True)
    reader = LogReader(tmp_path, 0)
    assert [r.lsn for r in reader.read(10, 100)] == list(range(1, 11))
    assert [r.lsn for r in reader.read(40, 5)] == list(range(11, 16))
    await wal.checkpoint(pb.CheckpointImage(lsn=30).SerializeToString(), 30)
    assert hub.checkpoint_lsn == 30 and segments_of(tmp_path)[0] > 1
    # The segment it has open was deleted: it still reads it to its end, then goes on in
    # the next one (kept: it holds records after the checkpoint).
    assert [r.lsn for r in reader.read(40, 100)][:25] == list(range(16, 41))
    reader.close()
    with pytest.raises(WalError):
        reader.read(40, 5)
    with pytest.raises(RecordsGone):
        LogReader(tmp_path, 0).read(40, 5)
    await wal.close()


async def test_snapshot_after_a_checkpoint_removed_segments(tmp_path: Path) -> None:
    config = replace(FAST, checkpoint_every=25)
    calls = FakeCalls({("Prepare", "no"): [NO]})
    wal, e, hub = await engine_with_feed(tmp_path, calls, segment=2048, config=config)
    gids = []
    for i in range(40):
        branches = two() if i % 4 else [two()[0], replace(two()[1], branch_id="no")]
        gids.append((await e.execute(key=f"k{i}", timeout_ms=0, branches=branches)).gid)
    open_txn = await e.begin(key="", timeout_ms=60_000)  # unfinished, in the image
    last = await wal.append(RecordType.BEGIN, begin(9999), sync=True)  # a marker record
    for _ in range(1000):  # the checkpoint and its clean-up run in the background
        if segments_of(tmp_path)[0] > 1 and hub.checkpoint_lsn:
            break
        await asyncio.sleep(0.01)
    events = await take(hub, 0, until=last)
    kinds = [ev.kind for ev in events]
    end = kinds.index(K.FEED_EVENT_KIND_SNAPSHOT_END)
    assert end > 0 and set(kinds[:end]) == {K.FEED_EVENT_KIND_SNAPSHOT}
    snap_lsn = events[end].lsn
    assert all(ev.lsn == snap_lsn for ev in events[: end + 1])
    assert snap_lsn == hub.checkpoint_lsn
    after = events[end + 1 :]
    assert lsns(after) == sorted(lsns(after)) and all(ev.lsn > snap_lsn for ev in after)
    # Projecting the feed gives every transaction's state as the coordinator has it.
    state: dict[str, int] = {}
    for ev in events:
        if ev.kind == K.FEED_EVENT_KIND_SNAPSHOT:
            state[ev.gid] = ev.transaction.state
            assert ev.transaction.gid == ev.gid
        elif ev.gid and ev.gid.startswith("s1"):
            state[ev.gid] = ev.state
    for gid in [*gids, open_txn.gid]:
        assert state[gid] == int(e.get(gid).state), gid
    snap = {ev.gid: ev.transaction for ev in events[:end]}
    if open_txn.gid in snap:
        assert snap[open_txn.gid].state == pb.TXN_STATE_ACTIVE
    await wal.close()
