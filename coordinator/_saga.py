"""Orchestrated sagas: which step runs next, and what to undo.

Persistence, timers, retries and the transaction table are the engine's (this mode sees
them through :class:`~accord.coordinator._host.Host`); this module sequences steps. Steps
whose dependencies have all succeeded run in parallel.

What is forced to the WAL, and why (a crash keeps a prefix of the log: a record on disk
means every record before it is there too):

- The definition (SAGA_START) is forced before the first action is sent: it is what a
  restarted coordinator finishes the saga from.
- Step records (started, succeeded, failed, undelivered, compensating, compensated) only
  ride the group commit: appended, not waited for. A step whose start record is lost may
  still have been sent; the participant's barrier makes that safe either way: sent again,
  it is a duplicate answered with what was already done; compensated, an action that
  never arrived gets a recorded no-op (null compensation) and is refused if it arrives
  late. So after a restart, a saga found RUNNING treats every step with no record whose
  dependencies may have run as possibly sent (``recover``): it is re-sent going forward,
  compensated going back.
- The pivot's success is forced before any step after it is sent: after a restart, a
  saga whose pivot's success is not on disk may still compensate, so nothing past the
  pivot may have run.
- Every saga state change is forced: COMPENSATING before the first compensation is sent
  (a CancelSaga is in no other record: without it a restart could go forward again and
  complete a saga whose steps were already undone; forcing it also makes every step
  start before it durable, so a compensating saga knows exactly what was sent), and
  COMPLETED, COMPENSATED and STUCK before the client is told (a restart past the
  deadline would otherwise compensate a saga whose client was told COMPLETED).

Forward: a step's action is retried under its policy; ``ABORTED`` or a code in the
policy's ``final_codes`` fails it for good. Once the pivot has succeeded the saga only
goes forward: later steps are retried until they succeed. A failure before that (or
CancelSaga, or the deadline) turns the saga to COMPENSATING.

Backward: every step whose action was sent and not definitely refused (it may have taken
effect) is compensated, a step only after every step that depends on it, in parallel
where the DAG allows. A step none of whose attempts can have reached the participant
(each failed before it was sent: no connection, no live instance, a stream that could
not be opened; see ``_calls``) is recorded UNDELIVERED in its result record and not
compensated: sending its compensation to the participant that could not be reached
would only fail again and leave the saga STUCK. That record rides the group commit; if
it is lost in a crash the restarted coordinator knows nothing of what was sent before,
and compensates the step (the participant's barrier makes a compensation whose action
never arrived a recorded no-op). A compensation that keeps failing past its policy
leaves the saga STUCK for an operator (RetryTransaction), never silently half-done. The
same ``run`` drives live sagas and sagas found unfinished in the WAL after a restart.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from dataclasses import replace

import accord.v1 as pb
from accord.common.retry import Backoff
from accord.coordinator._calls import CallResult, Verdict
from accord.coordinator._errors import FailedPrecondition
from accord.coordinator._failpoints import Failpoint
from accord.coordinator._host import CallPolicy, Host, Replayed
from accord.coordinator._methods import Method
from accord.coordinator._model import StepRt, Txn
from accord.coordinator._records import Record, RecordType
from accord.coordinator._specs import SagaSpec, StepRetry, saga_from_pb
from accord.coordinator._states import BranchState, TxnState
from accord.coordinator._validate import after_pivot, topological_order

log = logging.getLogger("accord.coordinator.saga")

DEFAULT_ATTEMPTS = 5
DEFAULT_INITIAL_MS = 100
DEFAULT_MAX_MS = 10_000

#: The step may have taken effect: it must be compensated if the saga goes back.
_MAY_HAVE_RUN = frozenset({BranchState.RUNNING, BranchState.SUCCEEDED, BranchState.COMPENSATING})
#: The step ended without taking effect: run again once the saga only goes forward.
_DID_NOT_RUN = frozenset({BranchState.FAILED, BranchState.UNDELIVERED})


def _may_have_succeeded(step: StepRt) -> bool:
    """Whether a restarted saga's ``step`` may have succeeded in the last life. The
    pivot's success is forced before any step after it is sent, so a pivot with no
    success on disk did not let anything after it run."""
    if step.state == BranchState.SUCCEEDED:
        return True
    return step.state == BranchState.RUNNING and not step.spec.pivot


class SagaMode:
    protocol: int = pb.PROTOCOL_SAGA
    records = frozenset({RecordType.SAGA_START, RecordType.SAGA_STEP, RecordType.SAGA_STATE})
    misuse = "is a saga: use CancelSaga"

    def __init__(self, host: Host) -> None:
        self._host = host
        self._fp = host.failpoints
        self._tel = host.telemetry

    # ------------------------------------------------------------------ model

    def build(self, rec: pb.WalSagaStart, spec: SagaSpec, after: list[bool] | None = None) -> Txn:
        """A saga's in-memory form from its SAGA_START record (live or replayed) and its
        definition (``spec``, the same as ``rec.definition``); ``after`` (which steps are
        the pivot or after it) when validation computed it."""
        names = {st.name: i for i, st in enumerate(spec.steps)}
        if after is None:
            after = after_pivot(spec, topological_order(spec))
        wire = rec.definition.steps
        resolved = rec.resolved_addresses
        steps = [
            StepRt(
                index=i,
                spec=st,
                wire=wire[i],
                resolved=resolved[i] if i < len(resolved) else st.address,
                deps=[names[n] for n in st.depends_on],
                after_pivot=after[i],
            )
            for i, st in enumerate(spec.steps)
        ]
        for st in steps:
            for dep in st.deps:
                steps[dep].dependents.append(st.index)
        return Txn(
            gid=rec.gid,
            protocol=pb.PROTOCOL_SAGA,
            key=rec.idempotency_key,
            caller=rec.caller,
            digest=rec.request_digest,
            created_ms=rec.created_unix_ms,
            deadline_ms=rec.deadline_unix_ms,
            state=TxnState.RUNNING,
            claimed=TxnState.RUNNING,
            steps=steps,
            rec_saga=rec,
        )

    @staticmethod
    def apply_step(step: StepRt, rec: pb.WalSagaStep) -> None:
        step.state = BranchState(rec.state)
        if rec.state in (
            pb.BRANCH_STATE_RUNNING,
            pb.BRANCH_STATE_SUCCEEDED,
            pb.BRANCH_STATE_FAILED,
            pb.BRANCH_STATE_UNDELIVERED,
        ):
            step.attempts = max(step.attempts, rec.attempts)
        if rec.state in (pb.BRANCH_STATE_COMPENSATING, pb.BRANCH_STATE_COMPENSATED):
            step.compensation_attempts = rec.compensation_attempts
        if rec.error:
            step.last_error = rec.error
        if rec.result:
            step.result = rec.result

    @staticmethod
    def pivot_done(txn: Txn) -> bool:
        return any(st.spec.pivot and st.state == BranchState.SUCCEEDED for st in txn.steps)

    # ------------------------------------------------------------------ records

    def record(
        self, txn: Txn, new: TxnState, reason: str, commit_branches: Sequence[str]
    ) -> tuple[RecordType, Record, bool]:
        rec = pb.WalSagaState(gid=txn.gid, state=int(new), reason=reason)  # type: ignore[arg-type]
        txn.rec_saga_state = rec
        # Forced, every one: see the module docstring (the decision to compensate, and
        # every outcome a client is told).
        return RecordType.SAGA_STATE, rec, True

    def entered(self, txn: Txn, state: TxnState) -> None:
        return None

    def replay(self, rtype: RecordType, rec: Record, txn: Txn | None) -> Replayed | None:
        if isinstance(rec, pb.WalSagaStart):
            if txn is None:
                txn = self.build(rec, saga_from_pb(rec.definition))
            txn.traceparent = rec.traceparent
            return txn, None
        if txn is None:
            return None
        if isinstance(rec, pb.WalSagaStep):
            txn.rec_steps[rec.step] = rec
            step = txn.steps[rec.step]
            self.apply_step(step, rec)
            if rec.state == pb.BRANCH_STATE_RUNNING:
                step.reached = 1  # whatever the last life sent is unknown
            return txn, None
        assert isinstance(rec, pb.WalSagaState), rtype
        txn.rec_saga_state = rec
        txn.reason = rec.reason or txn.reason
        return txn, TxnState(rec.state)

    def _step_record(
        self, txn: Txn, step: StepRt, state: BranchState, error: str, result: bytes
    ) -> pb.WalSagaStep:
        rec = pb.WalSagaStep(
            gid=txn.gid,
            step=step.index,
            state=int(state),  # type: ignore[arg-type]
            attempts=step.attempts,
            error=error,
            result=result,
            saga_state=int(txn.state),  # type: ignore[arg-type]
            compensation_attempts=step.compensation_attempts,
        )
        txn.rec_steps[step.index] = rec
        return rec

    def _applied(self, txn: Txn, step: StepRt, rec: pb.WalSagaStep, lsn: int) -> None:
        self.apply_step(step, rec)
        txn.lsn = lsn
        if txn.watchers:
            self._host.publish(txn)

    def log_step(
        self, txn: Txn, step: StepRt, state: BranchState, *, error: str = "", result: bytes = b""
    ) -> None:
        """A step's state change: appended to ride the next group commit (not waited
        for), then applied."""
        rec = self._step_record(txn, step, state, error, result)
        self._applied(txn, step, rec, self._host.append_later(RecordType.SAGA_STEP, rec))

    async def force_step(
        self, txn: Txn, step: StepRt, state: BranchState, *, result: bytes = b""
    ) -> None:
        """A step's state change forced to disk before it is applied (the pivot's
        success)."""
        rec = self._step_record(txn, step, state, "", result)
        lsn = await self._host.append(RecordType.SAGA_STEP, rec, sync=True, parent=step.span)
        self._applied(txn, step, rec, lsn)

    # ------------------------------------------------------------------ client calls

    def cancel(self, txn: Txn, reason: str) -> None:
        """CancelSaga: before the pivot, the saga turns to compensate."""
        if txn.claimed == TxnState.COMPLETED or self.pivot_done(txn):
            raise FailedPrecondition(
                f"saga {txn.gid} is past its pivot ({txn.claimed.name}): it can only go forward"
            )
        if txn.claimed == TxnState.RUNNING:
            txn.reason = txn.reason or reason or "cancelled by the client"
            txn.abort_requested.set()
            if txn.wake is not None:
                txn.wake.set()

    async def retry(self, txn: Txn) -> None:
        """RetryTransaction of a STUCK saga: compensate again, every attempt afresh."""
        self._tel.recovering(txn, "operator retry")
        await self._host.transition(txn, TxnState.COMPENSATING, reason="retried by an operator")
        for st in txn.steps:
            st.compensation_attempts = 0

    async def recover(self, txn: Txn) -> bool:
        if txn.state == TxnState.STUCK:
            return False  # waits for an operator
        if txn.state == TxnState.RUNNING:
            self.maybe_sent(txn)
        self._tel.recovering(txn)
        return True

    @staticmethod
    def maybe_sent(txn: Txn) -> None:
        """A saga found RUNNING after a restart: a step with no record may have been
        started, and sent, by the last life (its start record rode the group commit and
        was lost), unless a dependency of it ended without running. Such a step counts
        as RUNNING with an unknown past, like a step whose start record is there: going
        forward it is sent again (a duplicate for the participant's barrier), going back
        it is compensated (a null compensation if its action never arrived). Memory
        only: nothing is logged for it until it is driven. A step after the pivot is
        never marked unless the pivot's success is on disk."""
        marked = True
        while marked:  # bounded: a pass that marks nothing ends it
            marked = False
            for st in txn.steps:
                if st.state == BranchState.PENDING and all(
                    _may_have_succeeded(txn.steps[d]) for d in st.deps
                ):
                    st.state = BranchState.RUNNING
                    st.reached = 1
                    marked = True

    # ------------------------------------------------------------------ driving

    async def run(self, txn: Txn) -> None:
        if txn.state == TxnState.RUNNING:
            await self._forward(txn)
        if txn.state == TxnState.COMPENSATING:
            await self._backward(txn)

    async def _forward(self, txn: Txn) -> None:
        loop = asyncio.get_running_loop()
        tasks: dict[int, asyncio.Task[bool]] = {}
        finished: list[int] = []
        failed: list[str] = []
        # One event wakes the loop: a step ending, CancelSaga, or the deadline (cheaper
        # than asyncio.wait over a set of tasks, or a timeout around every wait).
        wake = txn.wake = asyncio.Event()
        expired = False

        def ended(i: int, _task: object) -> None:
            finished.append(i)
            wake.set()

        def expire() -> None:
            nonlocal expired
            expired = True
            wake.set()

        timer = None
        if txn.deadline_ms and not self.pivot_done(txn):
            delay = max(0.0, (txn.deadline_ms - self._host.clock.now_ms()) / 1000)
            timer = loop.call_later(delay, expire)
        try:
            while True:
                if not failed and not txn.abort_requested.is_set():
                    pivot_done = self.pivot_done(txn)
                    for st in txn.steps:
                        again = pivot_done and st.state in _DID_NOT_RUN
                        if again:
                            tasks.pop(st.index, None)  # past the pivot: run it again
                        if st.index in tasks or not (
                            again or st.state in (BranchState.PENDING, BranchState.RUNNING)
                        ):
                            continue
                        if all(txn.steps[d].state == BranchState.SUCCEEDED for d in st.deps):
                            task = loop.create_task(self._step(txn, st))
                            task.add_done_callback(functools.partial(ended, st.index))
                            tasks[st.index] = task
                running = [t for t in tasks.values() if not t.done()]
                if not running:
                    break
                # Past the pivot the deadline no longer applies.
                if (
                    not finished
                    and not txn.abort_requested.is_set()
                    and not (expired and not self.pivot_done(txn))
                ):
                    wake.clear()
                    await wake.wait()
                for i in finished:
                    t = tasks[i]
                    if not t.cancelled() and not t.result():
                        st = txn.steps[i]
                        failed.append(f"step {st.spec.name} failed: {st.last_error}")
                finished.clear()
                if self.pivot_done(txn):
                    failed.clear()  # past the pivot nothing fails: steps retry until done
                    continue
                if failed or txn.abort_requested.is_set() or expired:
                    if expired:
                        failed.append("deadline passed before the saga completed")
                    # Steps still in flight may or may not take effect: stop them and
                    # compensate them with the rest (their state stays RUNNING).
                    running = [t for t in tasks.values() if not t.done()]
                    for t in running:
                        t.cancel()
                    await asyncio.gather(*running, return_exceptions=True)
                    break
        finally:
            if timer is not None:
                timer.cancel()
        txn.wake = None
        if all(st.state == BranchState.SUCCEEDED for st in txn.steps):
            await self._host.transition(txn, TxnState.COMPLETED)
            return
        if not failed and not txn.abort_requested.is_set():
            # Resumed after a restart with a step that had already failed for good.
            failed = [
                f"step {st.spec.name} failed: {st.last_error}"
                for st in txn.steps
                if st.state in _DID_NOT_RUN
            ]
        reason = failed[0] if failed else (txn.reason or "cancelled by the client")
        await self._host.transition(txn, TxnState.COMPENSATING, reason=reason)

    async def _step(self, txn: Txn, st: StepRt) -> bool:
        """Runs one action to a final answer; False when it failed for good (or its
        attempts ran out before the pivot)."""
        with self._tel.step(txn, st, compensation=False):
            return await self._step_traced(txn, st)

    async def _step_traced(self, txn: Txn, st: StepRt) -> bool:
        # A step RUNNING here was started before a restart: it may have been sent then.
        st.reached = 1 if st.state == BranchState.RUNNING else 0
        # Not waited for: the definition is on disk, and the barrier makes a step whose
        # start is lost safe to send again or to compensate (module docstring).
        self.log_step(txn, st, BranchState.RUNNING)
        await self._fp.acheck(Failpoint.BEFORE_STEP_SEND)
        # The pivot, and everything after it, must reach a definite answer.
        forever = st.after_pivot
        result = await self._attempts(
            txn, st, st.spec.action, st.spec.payload, forever=forever, compensation=False
        )
        await self._fp.acheck(Failpoint.AFTER_STEP_RESULT)
        if result is None:
            if st.reached == 0:
                self._undelivered(txn, st, "attempts ran out")
            # else: outcome unknown, the state stays RUNNING (compensated if need be)
            return False
        if result.verdict == Verdict.OK:
            if st.spec.pivot:
                # Nothing past the pivot is sent before its success is on disk.
                await self.force_step(txn, st, BranchState.SUCCEEDED, result=result.result)
            else:
                self.log_step(txn, st, BranchState.SUCCEEDED, result=result.result)
            return True
        if forever:
            raise AssertionError("a step after the pivot cannot fail")  # pragma: no cover
        self.log_step(txn, st, BranchState.FAILED, error=result.detail)
        return False

    def _undelivered(self, txn: Txn, st: StepRt, why: str) -> None:
        """Records that no attempt of ``st``'s action can have reached the participant."""
        error = f"not delivered ({why}; no attempt reached the participant): {st.last_error}"
        log.info(
            "event=saga_step_undelivered gid=%s step=%s attempts=%d why=%r",
            txn.gid,
            st.spec.name,
            st.attempts,
            st.last_error,
        )
        self.log_step(txn, st, BranchState.UNDELIVERED, error=error)

    async def _backward(self, txn: Txn) -> None:
        for st in txn.steps:
            # Stopped (cancel, deadline) between attempts none of which was sent.
            if st.state == BranchState.RUNNING and st.reached == 0:
                self._undelivered(txn, st, "stopped")
        todo = {
            st.index
            for st in txn.steps
            if st.state in _MAY_HAVE_RUN and not (st.after_pivot and self.pivot_done(txn))
        }
        for st in txn.steps:
            if st.state == BranchState.PENDING:
                st.state = BranchState.SKIPPED
        stuck: list[str] = []
        done_count = 0
        loop = asyncio.get_running_loop()
        tasks: dict[int, asyncio.Task[bool]] = {}
        while True:
            for i in sorted(todo):
                if i in tasks:
                    continue
                st = txn.steps[i]
                # Reverse dependency order: only after every dependent is undone.
                if all(
                    d not in todo or (d in tasks and tasks[d].done() and tasks[d].result())
                    for d in st.dependents
                ):
                    tasks[i] = loop.create_task(self._compensate(txn, st))
            running = {t for t in tasks.values() if not t.done()}
            if not running:
                break
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t.result():
                    done_count += 1
                    if done_count == 1:
                        await self._fp.acheck(Failpoint.MID_COMPENSATION)
        # Compensations that ran and failed first (the cause), then those they blocked.
        for i in sorted(todo, key=lambda i: (i not in tasks, -i)):
            task = tasks.get(i)
            if task is None or not task.result():
                st = txn.steps[i]
                stuck.append(
                    f"compensation of step {st.spec.name} failed: {st.last_error or 'blocked by a failed dependent'}"
                )
        if stuck:
            log.error("event=saga_stuck gid=%s reasons=%r", txn.gid, "; ".join(stuck))
            await self._host.transition(txn, TxnState.STUCK, reason=stuck[0])
            return
        await self._host.transition(txn, TxnState.COMPENSATED)

    async def _compensate(self, txn: Txn, st: StepRt) -> bool:
        if st.state == BranchState.COMPENSATED:
            return True
        with self._tel.step(txn, st, compensation=True):
            return await self._compensate_traced(txn, st)

    async def _compensate_traced(self, txn: Txn, st: StepRt) -> bool:
        self.log_step(txn, st, BranchState.COMPENSATING)
        payload = st.spec.compensation_payload or st.spec.payload
        result = await self._attempts(
            txn, st, st.spec.compensation, payload, forever=False, compensation=True
        )
        if result is None or result.verdict != Verdict.OK:
            if result is not None:
                st.last_error = result.detail
            return False
        self.log_step(txn, st, BranchState.COMPENSATED)
        return True

    async def _attempts(
        self,
        txn: Txn,
        st: StepRt,
        operation: str,
        payload: bytes,
        *,
        forever: bool,
        compensation: bool,
    ) -> CallResult | None:
        """Calls until a final answer. Returns None when the attempts run out."""
        host = self._host
        action, undo = st.policies or self._policies(st)
        request = host.request(txn.gid, st.spec.name, operation, payload)
        if compensation:
            return await host.call(
                txn, st, Method.COMPENSATE, request, undo, parent=st.span or txn.span
            )

        def only_forward() -> bool:
            # Once the pivot has succeeded (maybe while this step retries), a "no" is
            # retried like "retry later", past any number of attempts.
            return forever or self.pivot_done(txn)

        return await host.call(
            txn,
            st,
            Method.EXECUTE,
            request,
            action,
            parent=st.span or txn.span,
            forever=only_forward,
        )

    def _policies(self, st: StepRt) -> tuple[CallPolicy, CallPolicy]:
        """The step's retry policies (action, compensation) from its definition."""
        r = st.spec.retry or StepRetry()
        attempt_s = st.spec.timeout_ms / 1000 or self._host.config.call_timeout_s
        action = CallPolicy(
            backoff=Backoff(
                initial_s=(r.initial_interval_ms or DEFAULT_INITIAL_MS) / 1000,
                multiplier=r.multiplier or 2.0,
                max_s=(r.max_interval_ms or DEFAULT_MAX_MS) / 1000,
            ),
            attempt_s=attempt_s,
            max_attempts=r.max_attempts or DEFAULT_ATTEMPTS,
            final_codes=frozenset(r.final_codes),
            no_is_error=True,
        )
        # A compensation must run: a "no" is retried until the attempts run out.
        st.policies = (action, replace(action, no_is_final=False))
        return st.policies
