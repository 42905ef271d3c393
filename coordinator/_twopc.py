"""Two-phase commit: which branch gets which call next, which state follows, which record
each state change writes, and what recovery does.

Persistence, retries, timers and the transaction table are the engine's (this mode sees
them through :class:`~accord.coordinator._host.Host`). The same ``run`` drives live
transactions and those found unfinished in the WAL after a restart, whatever state they
were left in.

Presumed abort: the branch list is logged (not forced) before the first Prepare; only
the COMMIT decision is forced; abort records and END are never forced; a transaction
found without a decision after a restart is aborted (:meth:`TwoPhaseCommit.recover`).
Optimisations: a read-only vote leaves phase two; a single-branch transaction commits in
one phase (the participant's answer is then the outcome, so after a crash the one-phase
Commit is sent again and the participant's barrier answers with what it already did).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import accord.v1 as pb
from accord.coordinator._calls import CallResult, Verdict
from accord.coordinator._failpoints import Failpoint
from accord.coordinator._host import CallPolicy, Host, Replayed
from accord.coordinator._methods import Method
from accord.coordinator._model import BranchRt, Txn
from accord.coordinator._records import Record, RecordType
from accord.coordinator._states import BranchState, TxnState

T = TypeVar("T")

log = logging.getLogger("accord.coordinator.2pc")


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


class TwoPhaseCommit:
    protocol: int = pb.PROTOCOL_TWO_PHASE_COMMIT
    records = frozenset(
        {RecordType.BEGIN, RecordType.PREPARE, RecordType.COMMIT, RecordType.ABORT, RecordType.END}
    )
    misuse = "is not a saga (use Abort)"

    def __init__(self, host: Host) -> None:
        self._host = host
        self._fp = host.failpoints
        self._tel = host.telemetry
        cfg = host.config
        self._unsafe_ignore_no_votes = cfg.unsafe_ignore_no_votes
        #: Every 2PC call: retried until it is answered (or the Prepare deadline).
        self._policy = CallPolicy(backoff=cfg.retry, attempt_s=cfg.call_timeout_s)

    # ------------------------------------------------------------------ records

    def record(
        self, txn: Txn, new: TxnState, reason: str, commit_branches: Sequence[str]
    ) -> tuple[RecordType, Record, bool]:
        if new == TxnState.PREPARING:
            rec_p = pb.WalPrepare(
                gid=txn.gid,
                idempotency_key=txn.key,
                request_digest=txn.digest,
                created_unix_ms=txn.created_ms,
                deadline_unix_ms=txn.deadline_ms,
                branches=[b.spec() for b in txn.branches],
                resolved_addresses=[b.resolved for b in txn.branches],
                one_phase=txn.one_phase,
                traceparent=txn.traceparent,
                caller=txn.caller,
            )
            txn.rec_prepare = rec_p
            # Rides the group commit: written before the first Prepare, not forced.
            return RecordType.PREPARE, rec_p, False
        if new == TxnState.COMMITTING:
            rec_c = pb.WalCommit(gid=txn.gid, branch_ids=list(commit_branches))
            txn.rec_commit = rec_c
            return RecordType.COMMIT, rec_c, True  # the one forced record: the decision
        if new == TxnState.ABORTING:
            rec_a = pb.WalAbort(gid=txn.gid, reason=reason)
            txn.rec_abort = rec_a
            return RecordType.ABORT, rec_a, False  # presumed abort: never forced
        rec_e = pb.WalEnd(gid=txn.gid, state=int(new), reason=reason or txn.reason)  # type: ignore[arg-type]
        # Checkpoints keep END of every retained transaction: without the branches below,
        # which only the feed reads (replay does not), so images do not grow with them.
        txn.rec_end = pb.WalEnd(gid=rec_e.gid, state=rec_e.state, reason=rec_e.reason)
        # Each branch's outcome, for the feed (the spec is in WalPrepare: only the id).
        final = BranchState.COMMITTED if new == TxnState.COMMITTED else BranchState.ABORTED
        for b in txn.branches:
            state = final if b.state in (BranchState.PENDING, BranchState.PREPARED) else b.state
            rec_e.branches.add(
                branch=pb.Branch(branch_id=b.branch_id),
                state=int(state),
                attempts=b.attempts,
                last_error=b.last_error,
                resolved_address=b.resolved,
            )
        return RecordType.END, rec_e, False  # lazy

    def entered(self, txn: Txn, state: TxnState) -> None:
        if state == TxnState.COMMITTING and txn.rec_commit is not None:
            phase_two = set(txn.rec_commit.branch_ids)
            for b in txn.branches:
                b.state = (
                    BranchState.PREPARED if b.branch_id in phase_two else BranchState.READ_ONLY
                )
        if state.final:
            final = BranchState.COMMITTED if state == TxnState.COMMITTED else BranchState.ABORTED
            for b in txn.branches:
                if b.state in (BranchState.PENDING, BranchState.PREPARED):
                    b.state = final

    def replay(self, rtype: RecordType, rec: Record, txn: Txn | None) -> Replayed | None:
        if isinstance(rec, pb.WalBegin | pb.WalPrepare):
            if txn is None:
                txn = Txn(gid=rec.gid)
            txn.key = rec.idempotency_key
            txn.caller = rec.caller
            txn.digest = rec.request_digest
            txn.created_ms = rec.created_unix_ms
            txn.deadline_ms = rec.deadline_unix_ms
            txn.traceparent = rec.traceparent or txn.traceparent
            if isinstance(rec, pb.WalBegin):
                txn.rec_begin = rec
                return txn, None
            txn.rec_prepare = rec
            txn.one_phase = rec.one_phase
            resolved = rec.resolved_addresses
            txn.branches = [
                BranchRt(
                    branch_id=b.branch_id,
                    service=b.service,
                    address=b.address,
                    operation=b.operation,
                    payload=b.payload,
                    resolved=resolved[i] if i < len(resolved) else "",
                )
                for i, b in enumerate(rec.branches)
            ]
            return txn, TxnState.PREPARING
        if txn is None:
            return None
        if isinstance(rec, pb.WalCommit):
            txn.rec_commit = rec
            return txn, TxnState.COMMITTING
        if isinstance(rec, pb.WalAbort):
            txn.rec_abort = rec
            txn.reason = txn.reason or rec.reason
            return txn, TxnState.ABORTING
        assert isinstance(rec, pb.WalEnd), rtype
        txn.rec_end = rec
        txn.reason = txn.reason or rec.reason
        return txn, TxnState(rec.state)

    # ------------------------------------------------------------------ recovery

    async def recover(self, txn: Txn) -> bool:
        self._tel.recovering(txn)
        if txn.state == TxnState.ACTIVE:
            await self._host.transition(
                txn, TxnState.ABORTING, reason="coordinator restarted before Commit"
            )
        elif txn.state == TxnState.PREPARING and not txn.one_phase:
            # Presumed abort: no decision record survived, so none was ever answered.
            await self._host.transition(
                txn,
                TxnState.ABORTING,
                reason="coordinator restarted before a decision (presumed abort)",
            )
        return True

    # ------------------------------------------------------------------ driving

    async def run(self, txn: Txn) -> None:
        phase = self._tel.phase
        if txn.state == TxnState.PREPARING:
            if txn.one_phase:
                with phase(txn, "commit"):
                    await self._one_phase(txn)
                return
            await self._prepare_phase(txn)
        if txn.state == TxnState.COMMITTING:
            with phase(txn, "commit"):
                await self._phase_two(txn, Method.COMMIT)
        elif txn.state == TxnState.ABORTING:
            with phase(txn, "abort"):
                await self._phase_two(txn, Method.ABORT)

    async def _call(
        self,
        txn: Txn,
        b: BranchRt,
        method: Method,
        *,
        deadline_ms: int | None,
        one_phase: bool = False,
        stop: asyncio.Event | None = None,
    ) -> CallResult | None:
        host = self._host
        request = host.request(txn.gid, b.branch_id, b.operation, b.payload, one_phase=one_phase)
        return await host.call(
            txn,
            b,
            method,
            request,
            self._policy,
            parent=txn.phase_span or txn.span,
            deadline_ms=deadline_ms,
            stop=stop,
        )

    async def _prepare_phase(self, txn: Txn) -> None:
        await self._fp.acheck(Failpoint.BEFORE_PREPARE)
        refused: list[str] = []
        unsafe = self._unsafe_ignore_no_votes

        async def prepare(b: BranchRt) -> None:
            result = await self._call(
                txn, b, Method.PREPARE, deadline_ms=txn.deadline_ms, stop=txn.abort_requested
            )
            if result is None:
                return  # deadline or abort: the branch stays PENDING (may be prepared)
            if result.verdict == Verdict.OK:
                b.state = BranchState.READ_ONLY if result.read_only else BranchState.PREPARED
            elif unsafe:
                log.error("event=unsafe_ignored_no_vote gid=%s branch=%s", txn.gid, b.branch_id)
                b.state = BranchState.PREPARED
            else:
                b.state = BranchState.REFUSED
                refused.append(f"branch {b.branch_id} voted no: {result.detail}")
                txn.abort_requested.set()  # no need to wait for the other votes

        with self._tel.phase(txn, "prepare"):
            await concurrently([prepare(b) for b in txn.branches])
        await self._fp.acheck(Failpoint.AFTER_PREPARE_VOTES)
        with self._tel.phase(txn, "decision"):
            await self._decide(txn, refused)

    async def _decide(self, txn: Txn, refused: list[str]) -> None:
        host = self._host
        if refused:
            reason = refused[0]
        elif txn.abort_requested.is_set():
            reason = txn.reason or "aborted by the client"
        elif any(b.state == BranchState.PENDING for b in txn.branches):
            reason = "deadline passed while preparing"
        else:
            phase_two = [b.branch_id for b in txn.branches if b.state == BranchState.PREPARED]
            if not phase_two:
                await host.transition(txn, TxnState.COMMITTED)  # all read-only
                return
            await self._fp.acheck(Failpoint.BEFORE_DECISION)
            await host.transition(txn, TxnState.COMMITTING, commit_branches=phase_two)
            await self._fp.acheck(Failpoint.AFTER_DECISION_FSYNC)
            return
        await host.transition(txn, TxnState.ABORTING, reason=reason)

    async def _one_phase(self, txn: Txn) -> None:
        (b,) = txn.branches
        await self._fp.acheck(Failpoint.BEFORE_PREPARE)
        # No deadline: once sent, only the participant knows the outcome, so ask until
        # it answers (a retried one-phase Commit is answered by its barrier).
        result = await self._call(txn, b, Method.COMMIT, deadline_ms=None, one_phase=True)
        assert result is not None
        if result.verdict == Verdict.OK:
            b.state = BranchState.COMMITTED
            await self._fp.acheck(Failpoint.BEFORE_END_RECORD)
            await self._host.transition(txn, TxnState.COMMITTED)
        else:
            b.state = BranchState.REFUSED
            await self._host.transition(
                txn, TxnState.ABORTED, reason=f"branch {b.branch_id} voted no: {result.detail}"
            )

    async def _phase_two(self, txn: Txn, method: Method) -> None:
        commit = method is Method.COMMIT
        if commit:
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
                result = await self._call(txn, b, method, deadline_ms=None)
                assert result is not None
                if result.verdict == Verdict.OK or not commit:
                    break
                # A participant that refuses a Commit after voting yes breaks the
                # protocol; keep asking and make it loud.
                log.error(
                    "event=commit_refused_after_yes gid=%s branch=%s detail=%r",
                    txn.gid,
                    b.branch_id,
                    result.detail,
                )
                await asyncio.sleep(self._policy.backoff.max_s)
            b.state = done_state
            acked += 1
            if acked == 1 and commit:
                await self._fp.acheck(Failpoint.MID_COMMIT)

        if commit:
            await self._fp.acheck(Failpoint.BEFORE_COMMIT_SEND)
        await concurrently([finish(b) for b in todo])
        await self._fp.acheck(Failpoint.BEFORE_END_RECORD)
        await self._host.transition(txn, final)
