"""A saga's coordinator crashes at every point of its run, with every part of its log
that the crash can have lost (fast tier: fake WAL, a barrier-keeping fake participant).

Only the definition (SAGA_START), the pivot's success and the saga's state changes are
forced; step records ride the group commit. So a crash after any event (a record
appended, a participant call sent, the client answered) keeps any prefix of the log that
holds every forced record made before it, while the participants keep every call they
received. For each such pair the restarted coordinator must end the saga COMPLETED or
COMPENSATED with the participants' state exact: no action applied twice, every applied
action undone if compensated and none undone if completed, and the outcome the client
was told kept. Compensations of actions that never arrived are the barrier's recorded
no-ops (null compensations): counted, and seen.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

import accord.v1 as pb
from accord.coordinator import CoordinatorConfig, Engine, TxnState
from accord.coordinator._calls import CallResult, Verdict
from accord.coordinator._records import RecordType
from accord.coordinator._specs import SagaSpec, StepRetry, StepSpec
from tests.unit._fakes import FakeCalls, FakeClock, FakeWal

OK = CallResult(Verdict.OK)
NO = CallResult(Verdict.NO, detail="refused")
FAST_RETRY = StepRetry(initial_interval_ms=1, max_interval_ms=2, max_attempts=3)


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


@dataclass
class Bank:
    """The participant SDK's barrier rules for saga calls, on one dict: a recorded answer
    is returned again; a compensation before its action is a recorded no-op that also
    refuses the late action."""

    refuse: frozenset[str] = frozenset()
    barrier: dict[tuple[str, str, str], CallResult] = field(default_factory=dict)
    applied: Counter[str] = field(default_factory=Counter)
    undone: Counter[str] = field(default_factory=Counter)
    null: Counter[str] = field(default_factory=Counter)

    def handle(self, method: str, gid: str, branch: str) -> CallResult:
        key = (gid, branch, method)
        if key in self.barrier:
            return self.barrier[key]
        if method == "Execute":
            result = NO if branch in self.refuse else OK
            if result is OK:
                self.applied[branch] += 1
        else:
            action = self.barrier.get((gid, branch, "Execute"))
            if action is None:
                self.null[branch] += 1
                self.barrier[(gid, branch, "Execute")] = NO  # the late action is refused
            elif action.verdict == Verdict.OK:
                self.undone[branch] += 1
            result = OK
        self.barrier[key] = result
        return result


Event = tuple[str, Any]


class Timeline:
    """Everything the first life did, in order: records appended and calls received."""

    def __init__(self) -> None:
        self.events: list[Event] = []


class TracedWal(FakeWal):
    def __init__(self, timeline: Timeline) -> None:
        super().__init__()
        self.timeline = timeline
        self.on_record: Callable[[int, bytes], None] | None = None

    def submit(self, rtype: int, payload: bytes, *, sync: bool) -> tuple[int, asyncio.Future[None]]:
        out = super().submit(rtype, payload, sync=sync)
        self.timeline.events.append(("record", out[0]))
        if self.on_record is not None:
            self.on_record(rtype, payload)
        return out


class BankCalls(FakeCalls):
    def __init__(self, bank: Bank, timeline: Timeline | None = None) -> None:
        super().__init__()
        self.bank = bank
        self.timeline = timeline

    async def call(
        self,
        method: str,
        address: str,
        request: pb.BranchRequest,
        attempt_s: float,
        *,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> CallResult:
        # The request arrives (and takes effect) first; the answer comes a turn later,
        # so parallel steps overlap and a cancelled call may still have taken effect.
        if self.timeline is not None:
            self.timeline.events.append(("call", (method, request.gid, request.branch_id)))
        result = self.bank.handle(method, request.gid, request.branch_id)
        await asyncio.sleep(0)
        return result


@dataclass
class Case:
    steps: tuple[StepSpec, ...]
    refuse: frozenset[str] = frozenset()
    #: CancelSaga as this step's success is logged: before its dependents are started,
    #: with nothing in flight (no refused late action can then save a restart that
    #: forgot the decision).
    cancel_after: int | None = None
    #: Steps strictly after the pivot: never compensated, not even by a no-op.
    past_pivot: frozenset[str] = frozenset()


CASES = {
    "chain": Case((step("a"), step("b", "a"), step("c", "b"))),
    "chain-refused": Case((step("a"), step("b", "a"), step("c", "b")), frozenset({"c"})),
    "diamond": Case((step("a"), step("b"), step("c", "a", "b"))),
    "diamond-refused": Case((step("a"), step("b"), step("c", "a", "b")), frozenset({"b"})),
    # ship, after the pivot, has no compensation: it must never be asked to undo.
    "pivot": Case(
        (
            step("pay"),
            step("charge", "pay", pivot=True),
            step("ship", "charge", compensation=""),
        ),
        past_pivot=frozenset({"ship"}),
    ),
    "cancelled": Case((step("a"), step("b", "a"), step("c", "b")), cancel_after=0),
}


async def recover(records: list[tuple[int, int, bytes]], bank: Bank, clock: FakeClock) -> Engine:
    e = Engine(wal=FakeWal(), calls=BankCalls(bank), config=CoordinatorConfig(), clock=clock)
    e.replay(None, records)
    await e.resume()
    for t in list(e.table.all()):
        await asyncio.wait_for(t.decided.wait(), 3)
    return e


@pytest.mark.parametrize("past_deadline", [False, True], ids=["in-time", "past-deadline"])
@pytest.mark.parametrize("name", list(CASES))
async def test_a_crash_anywhere_with_any_unforced_tail_lost(name: str, past_deadline: bool) -> None:
    case = CASES[name]
    timeline = Timeline()
    wal = TracedWal(timeline)
    clock = FakeClock()
    first = Bank(case.refuse)
    e = Engine(wal=wal, calls=BankCalls(first, timeline), config=CoordinatorConfig(), clock=clock)
    if case.cancel_after is not None:

        def cancel(rtype: int, payload: bytes) -> None:
            if rtype != RecordType.SAGA_STEP:
                return
            rec = pb.WalSagaStep.FromString(payload)
            if rec.step == case.cancel_after and rec.state == pb.BRANCH_STATE_SUCCEEDED:
                # The engine's CancelSaga, minus its wait for the outcome.
                e._saga.cancel(e.get(rec.gid), "cancelled by the client")

        wal.on_record = cancel
    txn = await e.start_saga(
        key="k", timeout_ms=60_000, definition=SagaSpec(steps=case.steps), wait=True
    )
    told = txn.state
    if case.cancel_after is not None:
        assert told == TxnState.COMPENSATED and txn.reason == "cancelled by the client"
    timeline.events.append(("told", told))
    names = [s.name for s in case.steps]
    outcomes: Counter[str] = Counter()
    nulls = 0
    for k in range(len(timeline.events) + 1):
        done = timeline.events[:k]
        appended = [lsn for kind, lsn in done if kind == "record"]
        # A forced record is durable once anything has happened after it (its caller
        # only went on once it was); the unforced ones after it may all be lost.
        durable = 0
        for kind, lsn in done[:-1]:
            if kind == "record" and wal.records[lsn - 1][3]:
                durable = lsn
        told_now = any(kind == "told" for kind, _ in done)
        for keep in range(durable, len(appended) + 1):
            bank = Bank(case.refuse)
            for kind, what in done:
                if kind == "call":
                    method, gid, branch = what
                    bank.handle(method, gid, branch)
            before = (Counter(bank.applied), Counter(bank.undone))
            at = FakeClock(clock.now + (120_000 if past_deadline else 0))
            records = [(n, rt, p) for n, rt, p, _ in wal.records[:keep]]
            e2 = await recover(records, bank, at)
            where = (k, keep, done[-1] if done else None)
            if keep == 0:
                assert e2.table.find(txn.gid) is None and not bank.applied, where
                continue
            t2 = e2.get(txn.gid)
            assert t2.state in (TxnState.COMPLETED, TxnState.COMPENSATED), (where, t2.reason)
            if told_now:
                assert t2.state == told, where
            assert all(n <= 1 for n in bank.applied.values()), (where, bank.applied, before)
            for n in case.past_pivot:
                assert not bank.undone[n] and not bank.null[n], (where, n)
            if t2.state == TxnState.COMPLETED:
                assert all(bank.applied[n] == 1 for n in names), (where, bank.applied)
                assert not bank.undone, (where, bank.undone)
            else:
                assert bank.applied == bank.undone, (where, bank.applied, bank.undone)
            outcomes[t2.state.name] += 1
            nulls += sum(bank.null.values())
    assert outcomes, "no crash point recovered anything"
    if past_deadline and name not in ("pivot", "cancelled"):
        # Past the deadline a restart that finds no outcome compensates, including steps
        # whose start was lost: some of those never reached the participant.
        assert outcomes["COMPENSATED"] and nulls > 0, (outcomes, nulls)
