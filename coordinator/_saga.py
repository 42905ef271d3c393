"""Orchestrated sagas: which step runs next, and what to undo.

Persistence, timers and recovery are the engine's; this module sequences steps. Steps
whose dependencies have all succeeded run in parallel. A step start is forced to the
WAL before its action is sent (a lost start record would leave an effect nobody undoes);
results ride the group commit (a lost result is learned again by re-sending the action,
which the participant's barrier answers with what it already did).

Forward: a step's action is retried under its policy; ``ABORTED`` or a code in the
policy's ``final_codes`` fails it for good. Once the pivot has succeeded the saga only
goes forward: later steps are retried until they succeed. A failure before that (or
CancelSaga, or the deadline) turns the saga to COMPENSATING.

Backward: every step whose action was sent and not definitely refused (it may have taken
effect) is compensated, a step only after every step that depends on it, in parallel
where the DAG allows. A compensation that keeps failing past its policy leaves the saga
STUCK for an operator (RetryTransaction), never silently half-done. The same ``run``
drives live sagas and sagas found unfinished in the WAL after a restart.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING

import accord.v1 as pb
from accord.coordinator._calls import CallResult, Verdict
from accord.coordinator._config import RetryPolicy
from accord.coordinator._model import StepRt, Txn
from accord.coordinator._states import BranchState, TxnState
from accord.coordinator._validate import after_pivot, topological_order

if TYPE_CHECKING:
    from accord.coordinator._engine import Engine

log = logging.getLogger("accord.coordinator.saga")

DEFAULT_ATTEMPTS = 5
DEFAULT_INITIAL_MS = 100
DEFAULT_MAX_MS = 10_000

#: The step may have taken effect: it must be compensated if the saga goes back.
_MAY_HAVE_RUN = frozenset({BranchState.RUNNING, BranchState.SUCCEEDED, BranchState.COMPENSATING})


class SagaMode:
    def __init__(self, engine: Engine) -> None:
        self._e = engine
        self._fp = engine._fp

    # ------------------------------------------------------------------ model

    def build(self, rec: pb.WalSagaStart, after: list[bool] | None = None) -> Txn:
        """A saga's in-memory form from its SAGA_START record (live or replayed);
        ``after`` (which steps are the pivot or after it) when validation computed it."""
        d = rec.definition
        names = {st.name: i for i, st in enumerate(d.steps)}
        if after is None:
            after = after_pivot(d, topological_order(d))
        steps = [
            StepRt(
                index=i,
                spec=st,
                resolved=rec.resolved_addresses[i]
                if i < len(rec.resolved_addresses)
                else st.address,
                deps=[names[n] for n in st.depends_on],
                after_pivot=after[i],
            )
            for i, st in enumerate(d.steps)
        ]
        for st in steps:
            for dep in st.deps:
                steps[dep].dependents.append(st.index)
        txn = Txn(
            gid=rec.gid,
            protocol=pb.PROTOCOL_SAGA,
            key=rec.idempotency_key,
            digest=rec.request_digest,
            created_ms=rec.created_unix_ms,
            deadline_ms=rec.deadline_unix_ms,
            state=TxnState.RUNNING,
            claimed=TxnState.RUNNING,
            steps=steps,
            rec_saga=rec,
        )
        return txn

    @staticmethod
    def apply_step(step: StepRt, rec: pb.WalSagaStep) -> None:
        step.state = BranchState(rec.state)
        if rec.state in (
            pb.BRANCH_STATE_RUNNING,
            pb.BRANCH_STATE_SUCCEEDED,
            pb.BRANCH_STATE_FAILED,
        ):
            step.attempts = max(step.attempts, rec.attempts)
        if rec.error:
            step.last_error = rec.error
        if rec.result:
            step.result = rec.result

    @staticmethod
    def pivot_done(txn: Txn) -> bool:
        return any(st.spec.pivot and st.state == BranchState.SUCCEEDED for st in txn.steps)

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
        # One event wakes the loop: a step ending, or CancelSaga (cheaper than
        # asyncio.wait over a set of tasks on every step).
        wake = txn.wake = asyncio.Event()

        def ended(i: int, _task: object) -> None:
            finished.append(i)
            wake.set()

        while True:
            if not failed and not txn.abort_requested.is_set():
                pivot_done = self.pivot_done(txn)
                for st in txn.steps:
                    again = pivot_done and st.state == BranchState.FAILED
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
            timed_out = False
            if not finished and not txn.abort_requested.is_set():
                wake.clear()
                timeout = None
                if txn.deadline_ms and not self.pivot_done(txn):
                    timeout = max(0.0, (txn.deadline_ms - self._e._clock.now_ms()) / 1000)
                try:
                    async with asyncio.timeout(timeout):
                        await wake.wait()
                except TimeoutError:
                    timed_out = True
            for i in finished:
                t = tasks[i]
                if not t.cancelled() and not t.result():
                    st = txn.steps[i]
                    failed.append(f"step {st.spec.name} failed: {st.last_error}")
            finished.clear()
            if self.pivot_done(txn):
                failed.clear()  # past the pivot nothing fails: steps retry until done
                continue
            if failed or txn.abort_requested.is_set() or timed_out:
                if timed_out:
                    failed.append("deadline passed before the saga completed")
                # Steps still in flight may or may not take effect: stop them and
                # compensate them with the rest (their state stays RUNNING).
                running = [t for t in tasks.values() if not t.done()]
                for t in running:
                    t.cancel()
                await asyncio.gather(*running, return_exceptions=True)
                break
        txn.wake = None
        if all(st.state == BranchState.SUCCEEDED for st in txn.steps):
            await self._e.transition(txn, TxnState.COMPLETED)
            return
        reason = failed[0] if failed else (txn.reason or "cancelled by the client")
        await self._e.transition(txn, TxnState.COMPENSATING, reason=reason)

    async def _step(self, txn: Txn, st: StepRt) -> bool:
        """Runs one action to a final answer; False when it failed for good (or its
        attempts ran out before the pivot)."""
        with self._e._tel.step(txn, st, compensation=False):
            return await self._step_traced(txn, st)

    async def _step_traced(self, txn: Txn, st: StepRt) -> bool:
        await self._e.log_step(txn, st, BranchState.RUNNING, sync=True)
        await self._fp.acheck("before_step_send")
        # The pivot, and everything after it, must reach a definite answer.
        forever = st.after_pivot
        result = await self._attempts(
            txn, st, st.spec.action, st.spec.payload, forever=forever, compensation=False
        )
        await self._fp.acheck("after_step_result")
        if result is None:
            return False  # attempts exhausted: outcome unknown, state stays RUNNING
        if result.verdict == Verdict.OK:
            await self._e.log_step(txn, st, BranchState.SUCCEEDED, sync=False, result=result.result)
            return True
        if forever:
            raise AssertionError("a step after the pivot cannot fail")  # pragma: no cover
        await self._e.log_step(txn, st, BranchState.FAILED, sync=False, error=result.detail)
        return False

    async def _backward(self, txn: Txn) -> None:
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
                        await self._fp.acheck("mid_compensation")
        # Compensations that ran and failed first (the cause), then those they blocked.
        for i in sorted(todo, key=lambda i: (i not in tasks, -i)):
            task = tasks.get(i)
            if task is None or not task.result():
                st = txn.steps[i]
                stuck.append(
                    f"compensation of step {st.spec.name} failed: {st.last_error or 'blocked by a failed dependent'}"
                )
        if stuck:
            log.error("gid=%s saga STUCK: %s", txn.gid, "; ".join(stuck))
            await self._e.transition(txn, TxnState.STUCK, reason=stuck[0])
            return
        await self._e.transition(txn, TxnState.COMPENSATED)

    async def _compensate(self, txn: Txn, st: StepRt) -> bool:
        if st.state == BranchState.COMPENSATED:
            return True
        with self._e._tel.step(txn, st, compensation=True):
            return await self._compensate_traced(txn, st)

    async def _compensate_traced(self, txn: Txn, st: StepRt) -> bool:
        await self._e.log_step(txn, st, BranchState.COMPENSATING, sync=False)
        payload = st.spec.compensation_payload or st.spec.payload
        result = await self._attempts(
            txn, st, st.spec.compensation, payload, forever=False, compensation=True
        )
        if result is None or result.verdict != Verdict.OK:
            if result is not None:
                st.last_error = result.detail
            return False
        await self._e.log_step(txn, st, BranchState.COMPENSATED, sync=False)
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
        policy = st.spec.retry
        max_attempts = policy.max_attempts or DEFAULT_ATTEMPTS
        backoff = RetryPolicy(
            initial_s=(policy.initial_interval_ms or DEFAULT_INITIAL_MS) / 1000,
            multiplier=policy.multiplier or 2.0,
            max_s=(policy.max_interval_ms or DEFAULT_MAX_MS) / 1000,
        )
        final_codes = set(policy.final_codes)
        attempt_s = (
            (st.spec.timeout_ms / 1000) if st.spec.timeout_ms else self._e.config.call_timeout_s
        )
        request = self._e.branch_request(txn.gid, st.spec.name, operation, payload)
        method = "Compensate" if compensation else "Execute"
        n = 0
        while True:
            n += 1
            if compensation:
                st.compensation_attempts += 1
            else:
                st.attempts += 1
            forever = forever or (not compensation and self.pivot_done(txn))
            result, st.resolved = await self._e.call_participant(
                st.span or txn.span,
                method,
                st.spec.service,
                st.spec.address,
                st.resolved,
                request,
                attempt_s,
            )
            if result.verdict == Verdict.OK:
                return result
            final = result.verdict == Verdict.NO or result.code.name in final_codes
            st.last_error = result.detail
            if final and not forever and not compensation:
                return result
            if n >= max_attempts and not forever:
                return None
            if final and forever:
                log.error(
                    "gid=%s step %s after the pivot refused (%s); retrying",
                    txn.gid,
                    st.spec.name,
                    result.detail,
                )
            delay = backoff.delay(n, self._e._rand())
            await asyncio.sleep(delay)
