"""Sagas through the engine with a fake WAL and scripted participants (fast tier)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

import accord.v1 as pb
from accord.coordinator import (
    AlreadyExists,
    BranchState,
    CoordinatorConfig,
    Engine,
    FailedPrecondition,
    InvalidArgument,
    TxnState,
)
from accord.coordinator._calls import CallResult, Verdict
from accord.coordinator._model import Txn
from accord.coordinator._records import RecordType
from accord.coordinator._specs import BranchSpec, SagaSpec, StepRetry, StepSpec
from tests.unit._fakes import FakeCalls, FakeClock, FakeWal

FAST_RETRY = StepRetry(initial_interval_ms=1, max_interval_ms=2, max_attempts=3)
OK = CallResult(Verdict.OK)
NO = CallResult(Verdict.NO, detail="no cars left")
BUSY = CallResult(Verdict.RETRY, detail="UNAVAILABLE")


def step(name: str, *deps: str, pivot: bool = False, compensation: str = "undo") -> StepSpec:
    return StepSpec(
        name=name,
        service="svc",
        action="do",
        compensation=compensation,
        payload=name.encode(),
        depends_on=deps,
        retry=FAST_RETRY,
        pivot=pivot,
    )


class TimedCalls(FakeCalls):
    """Records when each call starts and ends, to observe real concurrency."""

    def __init__(
        self, answers: dict[tuple[str, str], list[CallResult]] | None = None, delay: float = 0.02
    ) -> None:
        super().__init__(answers or {})
        self.delay = delay
        self.spans: dict[tuple[str, str], tuple[float, float]] = {}
        self.in_flight = 0
        self.max_in_flight = 0

    async def call(
        self, method: str, address: str, request: pb.BranchRequest, attempt_s: float, **_kw: object
    ) -> CallResult:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(self.delay)
        self.in_flight -= 1
        result = await super().call(method, address, request, attempt_s)
        self.spans[(method, request.branch_id)] = (t0, loop.time())
        return result


def make(calls: FakeCalls) -> tuple[Engine, FakeWal]:
    wal = FakeWal()
    return Engine(wal=wal, calls=calls, config=CoordinatorConfig(), clock=FakeClock()), wal


def steps_of(txn: Txn) -> dict[str, BranchState]:
    return {s.spec.name: s.state for s in txn.steps}


async def start(e: Engine, *steps: StepSpec, key: str = "") -> Txn:
    return await e.start_saga(key=key, timeout_ms=0, definition=SagaSpec(steps=steps), wait=True)


async def test_independent_steps_run_in_parallel_and_dependents_wait() -> None:
    calls = TimedCalls()
    e, wal = make(calls)
    txn = await start(e, step("a"), step("b"), step("c", "a", "b"))
    assert txn.state == TxnState.COMPLETED
    assert calls.max_in_flight == 2  # a and b together, observed
    a, b, c = (calls.spans[("Execute", n)] for n in "abc")
    assert c[0] >= max(a[1], b[1])  # c only after both
    # Forced: the definition and the outcome; the step records ride the group commit.
    forced = [RecordType(r[1]) for r in wal.records if r[3]]
    assert forced == [RecordType.SAGA_START, RecordType.SAGA_STATE]
    steps = [r for r in wal.records if RecordType(r[1]) == RecordType.SAGA_STEP]
    assert len(steps) == 6 and not any(r[3] for r in steps)


async def test_failure_compensates_in_reverse_dependency_order() -> None:
    calls = TimedCalls({("Execute", "car"): [NO]})
    e, _ = make(calls)
    txn = await start(e, step("flight"), step("hotel", "flight"), step("car", "hotel"))
    assert txn.state == TxnState.COMPENSATED
    assert "no cars left" in txn.reason
    assert steps_of(txn) == {
        "flight": BranchState.COMPENSATED,
        "hotel": BranchState.COMPENSATED,
        "car": BranchState.FAILED,
    }
    comp = [b for m, b, _ in calls.log if m == "Compensate"]
    assert comp == ["hotel", "flight"]  # reverse order; the refused car is not compensated


async def test_parallel_compensation_where_the_dag_allows() -> None:
    calls = TimedCalls({("Execute", "d"): [NO]})
    e, _ = make(calls)
    txn = await start(e, step("a"), step("b"), step("d", "a", "b"))
    assert txn.state == TxnState.COMPENSATED
    ca, cb = calls.spans[("Compensate", "a")], calls.spans[("Compensate", "b")]
    assert ca[0] < cb[1] and cb[0] < ca[1]  # overlapping


async def test_exhausted_retries_compensate_the_unknown_step_too() -> None:
    calls = TimedCalls({("Execute", "b"): [BUSY]}, delay=0)
    e, _ = make(calls)
    txn = await start(e, step("a"), step("b", "a"))
    assert txn.state == TxnState.COMPENSATED
    assert [b for m, b, _ in calls.log if m == "Execute"].count("b") == 3  # max_attempts
    # b's answer never came: it may have run, so it is compensated as well, first.
    assert [b for m, b, _ in calls.log if m == "Compensate"] == ["b", "a"]


async def test_after_the_pivot_only_forward() -> None:
    calls = TimedCalls({("Execute", "ship"): [NO, BUSY, BUSY, BUSY, BUSY, OK]}, delay=0)
    e, _ = make(calls)
    txn = await start(
        e, step("pay"), step("charge", "pay", pivot=True), step("ship", "charge", compensation="")
    )
    assert txn.state == TxnState.COMPLETED
    assert not [m for m, _, _ in calls.log if m == "Compensate"]
    with pytest.raises(FailedPrecondition):
        await e.cancel_saga(txn.gid, "too late")


async def test_failing_compensation_is_stuck_then_retried_by_an_operator() -> None:
    calls = TimedCalls({("Execute", "b"): [NO], ("Compensate", "a"): [BUSY]}, delay=0)
    e, _ = make(calls)
    txn = await start(e, step("a"), step("b", "a"))
    assert txn.state == TxnState.STUCK
    assert "compensation of step a" in txn.reason
    stuck, _ = e.list([TxnState.STUCK], 10, "")
    assert [t.gid for t in stuck] == [txn.gid]
    calls.answers[("Compensate", "a")] = [OK]
    again = await e.retry(txn.gid)
    assert again.state == TxnState.COMPENSATED
    with pytest.raises(FailedPrecondition):
        await e.retry(txn.gid)


async def test_cancel_before_the_pivot_compensates_what_ran() -> None:
    calls = TimedCalls(delay=0.05)
    e, _ = make(calls)
    txn = await e.start_saga(
        key="",
        timeout_ms=0,
        definition=SagaSpec(steps=(step("a"), step("b", "a"))),
        wait=False,
    )
    await asyncio.sleep(0.07)  # a done, b in flight
    out = await e.cancel_saga(txn.gid, "user cancelled")
    assert out.state == TxnState.COMPENSATED and out.reason == "user cancelled"
    assert set(b for m, b, _ in calls.log if m == "Compensate") >= {"a"}


async def test_deadline_compensates() -> None:
    clock = FakeClock()

    class Slow(TimedCalls):
        async def call(
            self,
            method: str,
            address: str,
            request: pb.BranchRequest,
            attempt_s: float,
            **_kw: object,
        ) -> CallResult:
            if method == "Execute" and request.branch_id == "b":
                clock.now += 10_000
                await asyncio.sleep(5)
            return await super().call(method, address, request, attempt_s)

    calls = Slow(delay=0)
    e = Engine(wal=FakeWal(), calls=calls, config=CoordinatorConfig(), clock=clock)
    d = SagaSpec(steps=(step("a"), step("b", "a")))
    txn = await asyncio.wait_for(e.start_saga(key="", timeout_ms=1000, definition=d, wait=True), 3)
    assert txn.state == TxnState.COMPENSATED and "deadline" in txn.reason


async def test_idempotent_start() -> None:
    e, _ = make(TimedCalls(delay=0))
    t1 = await start(e, step("a"), key="trip-1")
    assert (await start(e, step("a"), key="trip-1")) is t1
    with pytest.raises(AlreadyExists):
        await start(e, step("a"), step("b"), key="trip-1")


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([], "at least one"),
        ([step("a", "b"), step("b", "a")], "cycle"),
        ([step("a", "a")], "itself"),
        ([step("a", "zzz")], "unknown step"),
        ([step("a"), step("a")], "duplicate"),
        ([step("a", compensation="")], "compensation is required"),
        ([step("a", pivot=True), step("b", pivot=True)], "at most one pivot"),
        (
            [
                StepSpec(
                    name="a", service="svc", action="do", compensation="u", payload=b"x" * 300_000
                )
            ],
            "payload",
        ),
        ([StepSpec(name="a", service="svc", compensation="u")], "operation is required"),
        ([StepSpec(name="bad name", service="svc", action="do", compensation="u")], "name"),
        (
            [
                StepSpec(
                    name="a",
                    service="svc",
                    action="do",
                    compensation="u",
                    retry=StepRetry(final_codes=("NOPE",)),
                )
            ],
            "status code",
        ),
    ],
)
async def test_bad_definitions(steps: list[StepSpec], message: str) -> None:
    e, wal = make(TimedCalls())
    with pytest.raises(InvalidArgument, match=message):
        await start(e, *steps)
    assert wal.records == [] and e.inflight == 0


async def _recover(wal: FakeWal, upto: int, calls: FakeCalls) -> Engine:
    e2 = Engine(wal=FakeWal(), calls=calls, config=CoordinatorConfig(), clock=FakeClock())
    e2.replay(None, [(n, rt, p) for n, rt, p, _ in wal.records[:upto]])
    await e2.resume()
    for t in list(e2.table.all()):
        await asyncio.wait_for(t.decided.wait(), 3)
    return e2


async def test_recovery_resumes_every_prefix_of_the_log() -> None:
    """Cut the log after every record: the restarted engine ends the saga completed,
    or compensated, never half-done; a step started before the cut is re-sent or
    compensated, never forgotten."""
    e, wal = make(TimedCalls(delay=0))
    txn = await start(e, step("a"), step("b", "a"), step("c", "b"))
    assert txn.state == TxnState.COMPLETED
    for upto in range(1, len(wal.records) + 1):
        calls = TimedCalls(delay=0)
        e2 = await _recover(wal, upto, calls)
        t2 = e2.get(txn.gid)
        assert t2.state == TxnState.COMPLETED, upto
        assert all(s.state == BranchState.SUCCEEDED for s in t2.steps)


async def test_recovery_of_a_compensating_saga() -> None:
    e, wal = make(TimedCalls({("Execute", "c"): [NO]}, delay=0))
    txn = await start(e, step("a"), step("b", "a"), step("c", "b"))
    assert txn.state == TxnState.COMPENSATED
    for upto in range(1, len(wal.records) + 1):
        calls = TimedCalls({("Execute", "c"): [NO]}, delay=0)
        e2 = await _recover(wal, upto, calls)
        t2 = e2.get(txn.gid)
        assert t2.state == TxnState.COMPENSATED, upto
        ran = {s.spec.name for s in t2.steps if s.state == BranchState.COMPENSATED}
        assert ran <= {"a", "b"}


async def test_2pc_calls_on_a_saga_are_refused_at_once() -> None:
    e, _ = make(TimedCalls(delay=0.05))
    txn = await e.start_saga(
        key="", timeout_ms=0, definition=SagaSpec(steps=(step("a"),)), wait=False
    )
    for call in (
        e.commit(txn.gid),
        e.abort(txn.gid, "x"),
        e.enlist(txn.gid, BranchSpec(service="s", operation="o")),
    ):
        with pytest.raises(FailedPrecondition, match="saga"):
            await asyncio.wait_for(call, 0.5)  # refused, not left waiting for the saga
    with pytest.raises(InvalidArgument, match="gid is required"):
        e.get("")
    await asyncio.wait_for(txn.finished.wait(), 2)


# ---------------------------------------------------------------- undelivered steps

#: A failed attempt whose request certainly never left the coordinator (no connection).
NOT_SENT = CallResult(
    Verdict.RETRY,
    detail="Execute b@svc:1: UNAVAILABLE: not sent: cannot connect",
    code=grpc.StatusCode.UNAVAILABLE,
    sent=False,
)
#: UNAVAILABLE after the request was written: it may have run.
LOST = CallResult(
    Verdict.RETRY, detail="UNAVAILABLE: stream broken", code=grpc.StatusCode.UNAVAILABLE
)


def compensated(calls: FakeCalls) -> list[str]:
    return [b for m, b, _ in calls.log if m == "Compensate"]


async def test_a_step_never_delivered_is_not_compensated() -> None:
    calls = TimedCalls({("Execute", "b"): [NOT_SENT]}, delay=0)
    e, wal = make(calls)
    txn = await start(e, step("a"), step("b", "a"), step("c", "b"))
    assert txn.state == TxnState.COMPENSATED, txn.reason
    assert steps_of(txn) == {
        "a": BranchState.COMPENSATED,
        "b": BranchState.UNDELIVERED,
        "c": BranchState.SKIPPED,
    }
    assert [b for m, b, _ in calls.log if m == "Execute"].count("b") == 3  # max_attempts
    assert compensated(calls) == ["a"]  # nothing sent to b
    b = txn.steps[1]
    assert b.attempts == 3 and "not delivered" in b.last_error and "cannot connect" in b.last_error
    assert txn.reason.startswith("step b failed: not delivered")
    # The UNDELIVERED result rides the group commit (only step starts are forced).
    results = [
        (pb.WalSagaStep.FromString(p), sync)
        for _, rt, p, sync in wal.records
        if rt == RecordType.SAGA_STEP
    ]
    undelivered = [(r, sync) for r, sync in results if r.state == pb.BRANCH_STATE_UNDELIVERED]
    assert [(r.step, r.attempts, sync) for r, sync in undelivered] == [(1, 3, False)]
    # What a client is shown.
    shown = {s.step.name: s.state for s in txn.to_pb().steps}
    assert shown["b"] == pb.BRANCH_STATE_UNDELIVERED


@pytest.mark.parametrize(
    "script",
    [
        [NOT_SENT, LOST, NOT_SENT],  # one attempt may have been delivered
        [NOT_SENT, NOT_SENT, CallResult(Verdict.RETRY, code=grpc.StatusCode.DEADLINE_EXCEEDED)],
        [CallResult(Verdict.RETRY, code=grpc.StatusCode.INTERNAL)],  # any other status
    ],
)
async def test_a_step_maybe_delivered_once_is_compensated(script: list[CallResult]) -> None:
    calls = TimedCalls({("Execute", "b"): list(script)}, delay=0)
    e, _ = make(calls)
    txn = await start(e, step("a"), step("b", "a"))
    assert txn.state == TxnState.COMPENSATED
    assert steps_of(txn) == {"a": BranchState.COMPENSATED, "b": BranchState.COMPENSATED}
    assert compensated(calls) == ["b", "a"]


async def test_an_undelivered_step_does_not_block_its_dependencies_compensation() -> None:
    # b and c both depend on a; b is never delivered, c refuses: a is compensated
    # (after c's failure and b's end), b gets nothing.
    calls = TimedCalls({("Execute", "b"): [NOT_SENT], ("Execute", "c"): [NO]}, delay=0)
    e, _ = make(calls)
    txn = await start(e, step("a"), step("b", "a"), step("c", "a"))
    assert txn.state == TxnState.COMPENSATED
    assert steps_of(txn)["b"] == BranchState.UNDELIVERED
    assert compensated(calls) == ["a"]


async def test_cancel_between_undelivered_attempts_records_undelivered() -> None:
    # Plain FakeCalls answer without suspending: the cancel lands in a backoff pause,
    # with no attempt in flight.
    slow_retry = StepRetry(initial_interval_ms=20, max_interval_ms=20, max_attempts=1000)
    b = StepSpec(
        name="b",
        service="svc",
        action="do",
        compensation="undo",
        depends_on=("a",),
        retry=slow_retry,
    )
    calls = FakeCalls({("Execute", "b"): [NOT_SENT]})
    e, _ = make(calls)
    txn = await e.start_saga(
        key="", timeout_ms=0, definition=SagaSpec(steps=(step("a"), b)), wait=False
    )
    for _ in range(100):
        if txn.steps[1].attempts >= 2:
            break
        await asyncio.sleep(0.01)
    out = await e.cancel_saga(txn.gid, "user cancelled")
    assert out.state == TxnState.COMPENSATED
    assert steps_of(out) == {"a": BranchState.COMPENSATED, "b": BranchState.UNDELIVERED}
    assert compensated(calls) == ["a"]


async def test_cancel_with_an_attempt_in_flight_compensates_it() -> None:
    calls = TimedCalls({("Execute", "b"): [NOT_SENT]}, delay=0.2)
    e, _ = make(calls)
    txn = await e.start_saga(
        key="", timeout_ms=0, definition=SagaSpec(steps=(step("a"), step("b", "a"))), wait=False
    )
    for _ in range(100):
        if txn.steps[1].attempts >= 1:
            break
        await asyncio.sleep(0.01)
    out = await e.cancel_saga(txn.gid, "user cancelled")  # b's first attempt in flight
    assert out.state == TxnState.COMPENSATED
    assert steps_of(out)["b"] == BranchState.COMPENSATED
    assert compensated(calls) == ["b", "a"]


async def test_recovery_of_an_undelivered_step_from_every_prefix() -> None:
    """Cut the log after every record. Without b's UNDELIVERED result in the log, the
    restarted coordinator cannot know what the dead one sent: b's start record rode the
    group commit, so b (and c after it) may have been sent even with no record of them.
    It compensates them (the participant's barrier makes a compensation whose action
    never arrived a recorded no-op), even though none of its own attempts of b reach the
    participant. From b's UNDELIVERED record on it never sends b's or c's compensation."""
    e, wal = make(TimedCalls({("Execute", "b"): [NOT_SENT]}, delay=0))
    txn = await start(e, step("a"), step("b", "a"), step("c", "b"))
    assert txn.state == TxnState.COMPENSATED
    steps = [
        (n, pb.WalSagaStep.FromString(p))
        for n, rt, p, _ in wal.records
        if rt == RecordType.SAGA_STEP
    ]
    b_started = next(n for n, r in steps if r.step == 1 and r.state == pb.BRANCH_STATE_RUNNING)
    b_marked = next(n for n, r in steps if r.state == pb.BRANCH_STATE_UNDELIVERED)
    assert b_started < b_marked
    seen = set()
    for upto in range(1, len(wal.records) + 1):
        calls = TimedCalls({("Execute", "b"): [NOT_SENT]}, delay=0)
        e2 = await _recover(wal, upto, calls)
        t2 = e2.get(txn.gid)
        states = steps_of(t2)
        assert t2.state == TxnState.COMPENSATED, (upto, t2.reason)
        assert states["a"] == BranchState.COMPENSATED, upto
        if upto < b_marked:
            seen.add("compensated")
            assert states["b"] == states["c"] == BranchState.COMPENSATED, upto
            assert compensated(calls) == ["c", "b", "a"], upto
        else:
            seen.add("undelivered")
            assert states["b"] == BranchState.UNDELIVERED, upto
            # Never started (a finished saga's replay leaves it PENDING: SKIPPED is not logged).
            assert states["c"] in (BranchState.SKIPPED, BranchState.PENDING), upto
            assert compensated(calls) in ([], ["a"]), upto
            assert t2.reason.startswith("step b failed: not delivered"), (upto, t2.reason)
    assert seen == {"compensated", "undelivered"}
