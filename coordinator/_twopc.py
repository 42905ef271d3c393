"""Two-phase commit: which branch gets which call next, and which state follows.

Persistence, retries, timers and recovery are the engine's; this module only sequences
the protocol. The same ``run`` drives live transactions and those found unfinished in
the WAL after a restart, whatever state they were left in.

Presumed abort: the branch list is logged (not forced) before the first Prepare; only
the COMMIT decision is forced; abort records and END are never forced. Optimisations: a
read-only vote leaves phase two; a single-branch transaction commits in one phase (the
participant's answer is then the outcome, so after a crash the one-phase Commit is sent
again and the participant's barrier answers with what it already did).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from accord.coordinator._calls import Verdict
from accord.coordinator._model import BranchRt, Txn
from accord.coordinator._states import BranchState, TxnState

if TYPE_CHECKING:
    from accord.coordinator._engine import Engine

T = TypeVar("T")


async def concurrently(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Like gather, but the first coroutine runs in the calling task: one task fewer per
    phase on the hot path (a two-branch transaction creates one task per phase)."""
    if not coros:
        return []
    loop = asyncio.get_running_loop()
    rest = [loop.create_task(c) for c in coros[1:]]
    try:
        first = await coros[0]
    except BaseException:
        for t in rest:
            t.cancel()
        raise
    return [first, *[await t for t in rest]]


log = logging.getLogger("accord.coordinator.2pc")


class TwoPhaseCommit:
    def __init__(self, engine: Engine) -> None:
        self._e = engine
        self._fp = engine._fp

    async def run(self, txn: Txn) -> None:
        phase = self._e._tel.phase
        if txn.state == TxnState.PREPARING:
            if txn.one_phase:
                with phase(txn, "commit"):
                    await self._one_phase(txn)
                return
            await self._prepare_phase(txn)
        if txn.state == TxnState.COMMITTING:
            with phase(txn, "commit"):
                await self._phase_two(txn, "Commit")
        elif txn.state == TxnState.ABORTING:
            with phase(txn, "abort"):
                await self._phase_two(txn, "Abort")

    async def _prepare_phase(self, txn: Txn) -> None:
        await self._fp.acheck("before_prepare")
        refused: list[str] = []

        async def prepare(b: BranchRt) -> None:
            result = await self._e.call_branch(
                txn, b, "Prepare", deadline_ms=txn.deadline_ms, stop=txn.abort_requested
            )
            if result is None:
                return  # deadline or abort: the branch stays PENDING (may be prepared)
            if result.verdict == Verdict.OK:
                b.state = BranchState.READ_ONLY if result.read_only else BranchState.PREPARED
            elif self._e.config.unsafe_ignore_no_votes:
                log.error("gid=%s UNSAFE: ignoring branch %s's no vote", txn.gid, b.branch_id)
                b.state = BranchState.PREPARED
            else:
                b.state = BranchState.REFUSED
                refused.append(f"branch {b.branch_id} voted no: {result.detail}")
                txn.abort_requested.set()  # no need to wait for the other votes

        with self._e._tel.phase(txn, "prepare"):
            await concurrently([prepare(b) for b in txn.branches])
        await self._fp.acheck("after_prepare_votes")
        with self._e._tel.phase(txn, "decision"):
            await self._decide(txn, refused)

    async def _decide(self, txn: Txn, refused: list[str]) -> None:
        if refused:
            reason = refused[0]
        elif txn.abort_requested.is_set():
            reason = txn.reason or "aborted by the client"
        elif any(b.state == BranchState.PENDING for b in txn.branches):
            reason = "deadline passed while preparing"
        else:
            phase_two = [b.branch_id for b in txn.branches if b.state == BranchState.PREPARED]
            if not phase_two:
                await self._e.transition(txn, TxnState.COMMITTED)  # all read-only
                return
            await self._fp.acheck("before_decision")
            await self._e.transition(txn, TxnState.COMMITTING, commit_branches=phase_two)
            await self._fp.acheck("after_decision_fsync")
            return
        await self._e.transition(txn, TxnState.ABORTING, reason=reason)

    async def _one_phase(self, txn: Txn) -> None:
        (b,) = txn.branches
        await self._fp.acheck("before_prepare")
        # No deadline: once sent, only the participant knows the outcome, so ask until
        # it answers (a retried one-phase Commit is answered by its barrier).
        result = await self._e.call_branch(txn, b, "Commit", deadline_ms=None, one_phase=True)
        assert result is not None
        if result.verdict == Verdict.OK:
            b.state = BranchState.COMMITTED
            await self._fp.acheck("before_end_record")
            await self._e.transition(txn, TxnState.COMMITTED)
        else:
            b.state = BranchState.REFUSED
            await self._e.transition(
                txn, TxnState.ABORTED, reason=f"branch {b.branch_id} voted no: {result.detail}"
            )

    async def _phase_two(self, txn: Txn, method: str) -> None:
        if method == "Commit":
            assert txn.rec_commit is not None
            targets = set(txn.rec_commit.branch_ids)
            todo = [b for b in txn.branches if b.branch_id in targets]
            done_state, final = BranchState.COMMITTED, TxnState.COMMITTED
        else:
            done_state, final = BranchState.ABORTED, TxnState.ABORTED
            todo = [
                b
                for b in txn.branches
                if b.state not in (BranchState.REFUSED, BranchState.READ_ONLY, BranchState.ABORTED)
            ]
            if txn.rec_prepare is None:
                todo = []  # aborted before Commit: no participant has heard of it
        acked = 0

        async def finish(b: BranchRt) -> None:
            nonlocal acked
            while True:
                result = await self._e.call_branch(txn, b, method, deadline_ms=None)
                assert result is not None
                if result.verdict == Verdict.OK or method == "Abort":
                    break
                # A participant that refuses a Commit after voting yes breaks the
                # protocol; keep asking and make it loud.
                log.error(
                    "gid=%s branch %s refused Commit after a yes vote: %s",
                    txn.gid,
                    b.branch_id,
                    result.detail,
                )
                await asyncio.sleep(self._e.config.retry.max_s)
            b.state = done_state
            acked += 1
            if acked == 1 and method == "Commit":
                await self._fp.acheck("mid_commit")

        if method == "Commit":
            await self._fp.acheck("before_commit_send")
        await concurrently([finish(b) for b in todo])
        await self._fp.acheck("before_end_record")
        await self._e.transition(txn, final)
