"""The transaction engine: one engine for every protocol.

The engine owns persistence (the WAL), timers, retries, idempotency keys, watchers and
recovery. A protocol module (``_twopc``) only decides which branches get which call next
and which state comes after. Every state change goes through :meth:`Engine.transition`:
check the state table, append the record, wait until it is durable, then change memory
and tell anyone. Recovery rebuilds the transactions from the WAL and hands every
unfinished one to the same driver that runs live ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from opentelemetry.trace import Span

import accord.v1 as pb
from accord.common.gid import gid_prefix, shard_of
from accord.common.telemetry import attach_span, bind_gid, outgoing_metadata
from accord.coordinator import _validate as v
from accord.coordinator._calls import CallResult, ParticipantCalls, Verdict
from accord.coordinator._config import CoordinatorConfig
from accord.coordinator._errors import (
    AlreadyExists,
    FailedPrecondition,
    IllegalTransition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from accord.coordinator._failpoints import Failpoints
from accord.coordinator._model import BranchRt, StepRt, Txn
from accord.coordinator._records import (
    RT_ABORT,
    RT_BEGIN,
    RT_COMMIT,
    RT_END,
    RT_PREPARE,
    RT_SAGA_START,
    RT_SAGA_STATE,
    RT_SAGA_STEP,
    Record,
    RecordType,
)
from accord.coordinator._states import BranchState, TxnState, allowed
from accord.coordinator._telemetry import CoordinatorTelemetry

log = logging.getLogger("accord.coordinator.engine")

#: Records replayed between two turns of the event loop at start-up.
REPLAY_CHUNK = 2_000


class WalLike(Protocol):
    """What the engine needs of the WAL (``accord.coordinator.wal.WAL`` in production)."""

    @property
    def last_lsn(self) -> int: ...

    def submit(
        self, rtype: int, payload: bytes, *, sync: bool
    ) -> tuple[int, asyncio.Future[None]]: ...

    async def checkpoint(self, image: bytes, lsn: int) -> None: ...


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class Caller(Protocol):
    """What the engine needs to reach participants (``ParticipantCalls``)."""

    def resolve(self, service: str, address: str) -> str: ...

    def known(self, service: str) -> bool: ...

    def describe(self) -> str: ...

    async def send(
        self,
        method: str,
        service: str,
        address: str,
        current: str,
        request: pb.BranchRequest,
        attempt_s: float,
        *,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> tuple[CallResult, str]: ...


def _checked_gid(gid: str) -> str:
    if not gid:
        raise InvalidArgument("gid is required")
    if len(gid) > 128:
        raise InvalidArgument("gid is longer than 128 characters")
    return gid


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(len(p).to_bytes(4, "little"))
        h.update(p)
    return h.digest()


class Engine:
    def __init__(
        self,
        *,
        wal: WalLike,
        calls: Caller | ParticipantCalls,
        config: CoordinatorConfig | None = None,
        clock: Clock | None = None,
        failpoints: Failpoints | None = None,
        rand: Callable[[], float] = random.random,
        telemetry: CoordinatorTelemetry | None = None,
    ) -> None:
        self._wal = wal
        self._calls = calls
        self.config = config or CoordinatorConfig()
        self._clock = clock or SystemClock()
        self._fp = failpoints or Failpoints()
        self._rand = rand
        self._tel = telemetry or CoordinatorTelemetry()
        self._tel.bind(self)
        self._txns: dict[str, Txn] = {}
        self._live: set[str] = set()
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._keys: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._records_since_checkpoint = 0
        self._checkpointing = False
        self._closed = False
        # ValueError for a shard name a gid cannot carry (the CLI checks it first).
        self._gid_shard = gid_prefix(self.config.shard)
        self._gid_prefix = os.urandom(4).hex()
        self._gid_seq = 0
        # Imported here to keep the mode pluggable without an import cycle.
        from accord.coordinator._saga import SagaMode
        from accord.coordinator._twopc import TwoPhaseCommit

        self._twopc = TwoPhaseCommit(self)
        self._saga = SagaMode(self)

    # ------------------------------------------------------------------ queries

    def get(self, gid: str) -> Txn:
        txn = self._txns.get(_checked_gid(gid))
        if txn is None:
            self._check_shard(gid)
            raise NotFound(f"unknown transaction {gid!r}")
        return txn

    def _check_shard(self, gid: str) -> None:
        """FAILED_PRECONDITION for an unknown gid made by another shard: it may well
        exist there, so "not found" (or, to a participant, "presumed aborted") would be
        wrong. The message names the owning shard, for a client to route by."""
        shard = shard_of(gid)
        if shard and shard != self.config.shard:
            raise FailedPrecondition(
                f"transaction {gid} belongs to shard {shard}; this coordinator owns shard "
                f"{self.config.shard}: send it to the owner of shard {shard}"
            )

    def _get_2pc(self, gid: str) -> Txn:
        txn = self.get(gid)
        if txn.protocol != pb.PROTOCOL_TWO_PHASE_COMMIT:
            raise FailedPrecondition(f"transaction {gid} is a saga: use CancelSaga")
        return txn

    @property
    def inflight(self) -> int:
        return len(self._live)

    def list(
        self, states: Sequence[TxnState], limit: int, page_token: str
    ) -> tuple[list[Txn], str]:
        wanted = set(states)
        gids = sorted(g for g in self._txns if g > page_token)
        out: list[Txn] = []
        for gid in gids:
            txn = self._txns[gid]
            if wanted and txn.state not in wanted:
                continue
            out.append(txn)
            if len(out) == limit:
                return out, gid
        return out, ""

    def query_outcome(self, gid: str) -> int:
        txn = self._txns.get(_checked_gid(gid))
        if txn is None:
            # Only this shard's gids can be presumed aborted; another shard's is a
            # misdirected question (answered "not yet": the participant asks again).
            self._check_shard(gid)
            # Recovery has finished before the server answers anything: a gid we do not
            # know was never decided to commit (presumed abort).
            return pb.OUTCOME_ABORTED
        if txn.state in (TxnState.COMMITTING, TxnState.COMMITTED):
            return pb.OUTCOME_COMMITTED
        if txn.state in (TxnState.ABORTING, TxnState.ABORTED):
            return pb.OUTCOME_ABORTED
        return pb.OUTCOME_IN_PROGRESS

    async def watch(self, gid: str) -> AsyncIterator[pb.TransactionEvent]:
        txn = self.get(gid)
        queue: asyncio.Queue[pb.TransactionEvent | None] = asyncio.Queue(
            self.config.limits.watch_queue
        )
        txn.watchers.append(queue)
        try:
            yield self._event(txn)
            if txn.state.final:
                return
            while True:
                event = await queue.get()
                if event is None:
                    return
                yield event
                if TxnState(event.state).final:
                    return
        finally:
            if queue in txn.watchers:
                txn.watchers.remove(queue)

    # ------------------------------------------------------------------ client API

    async def begin(self, *, key: str, timeout_ms: int) -> Txn:
        v.check_key(key, self.config.limits)
        timeout_ms = v.check_timeout(timeout_ms, self.config)
        digest = _digest(b"begin", str(timeout_ms).encode())
        if key:
            existing = self._by_key(key, digest)
            if existing is not None:
                return existing
        self._check_capacity()
        now = self._clock.now_ms()
        txn = Txn(gid=self._new_gid(now), key=key, digest=digest, created_ms=now)
        txn.deadline_ms = now + timeout_ms
        self._tel.started(txn)
        rec = pb.WalBegin(
            gid=txn.gid,
            idempotency_key=key,
            request_digest=digest,
            created_unix_ms=now,
            deadline_unix_ms=txn.deadline_ms,
            traceparent=txn.traceparent,
        )
        self._admit(txn)
        txn.rec_begin = rec
        lsn = await self._append(RT_BEGIN, rec, sync=False)
        txn.lsn = lsn
        self._arm_expiry(txn)
        return txn

    async def enlist(self, gid: str, branch: pb.Branch) -> str:
        txn = self._get_2pc(gid)
        v.check_branch(branch, self.config.limits)
        if txn.claimed != TxnState.ACTIVE:
            raise FailedPrecondition(
                f"transaction {gid} is {txn.claimed.name}: branches can only be enlisted "
                "while it is ACTIVE"
            )
        self._check_service(branch.service, branch.address)
        new = self._branch_rt(branch, len(txn.branches))
        old = txn.branch(new.branch_id)
        if old is not None:
            if old.same_spec(new):
                return old.branch_id
            raise AlreadyExists(
                f"branch {new.branch_id!r} is already enlisted with another request"
            )
        if len(txn.branches) >= self.config.limits.max_branches:
            raise ResourceExhausted(
                f"transaction {gid} already has {len(txn.branches)} branches "
                f"(limit {self.config.limits.max_branches})"
            )
        # Nothing is logged yet: no participant has heard of this branch, so a crash
        # before Commit loses nothing that would need undoing (presumed abort).
        txn.branches.append(new)
        return new.branch_id

    async def commit(self, gid: str) -> Txn:
        txn = self._get_2pc(gid)
        if txn.claimed == TxnState.ACTIVE:
            # Losing a race with Abort or another Commit is fine: report the outcome.
            with contextlib.suppress(IllegalTransition):
                await self._start(txn)
        return await self._outcome(txn)

    async def abort(self, gid: str, reason: str) -> Txn:
        txn = self._get_2pc(gid)
        reason = reason or "aborted by the client"
        if txn.claimed == TxnState.ACTIVE:
            try:
                await self.transition(txn, TxnState.ABORTING, reason=reason)
            except IllegalTransition:
                pass
            else:
                self._spawn_driver(txn)
        elif txn.claimed == TxnState.PREPARING:
            txn.reason = txn.reason or reason
            txn.abort_requested.set()
        await txn.decided.wait()
        if txn.state in (TxnState.COMMITTING, TxnState.COMMITTED):
            raise FailedPrecondition(f"transaction {gid} is already committed")
        return await self._outcome(txn)

    async def execute(self, *, key: str, timeout_ms: int, branches: Sequence[pb.Branch]) -> Txn:
        limits = self.config.limits
        v.check_key(key, limits)
        timeout_ms = v.check_timeout(timeout_ms, self.config)
        v.check_branch_count(len(branches), limits)
        rts: list[BranchRt] = []
        seen: set[str] = set()
        for i, b in enumerate(branches):
            v.check_branch(b, limits, f"branches[{i}]")
            rt = self._branch_rt(b, i)
            if rt.branch_id in seen:
                raise v.InvalidArgument(f"branches[{i}]: duplicate branch_id {rt.branch_id!r}")
            seen.add(rt.branch_id)
            rts.append(rt)
        for b in branches:
            self._check_service(b.service, b.address)
        digest = b""
        if key:
            digest = _digest(
                b"execute",
                str(timeout_ms).encode(),
                *(b.SerializeToString(deterministic=True) for b in branches),
            )
            existing = self._by_key(key, digest)
            if existing is not None:
                return await self._outcome(existing)
        self._check_capacity()
        now = self._clock.now_ms()
        txn = Txn(gid=self._new_gid(now), key=key, digest=digest, created_ms=now)
        txn.deadline_ms = now + timeout_ms
        txn.branches = rts
        self._admit(txn)
        self._tel.started(txn)
        try:
            await self._start(txn)
        except BaseException:
            if txn.claimed == TxnState.ACTIVE:
                self._forget(txn)
                self._tel.closing(txn)
            raise
        return await self._outcome(txn)

    # ------------------------------------------------------------------ sagas

    async def start_saga(
        self, *, key: str, timeout_ms: int, definition: pb.SagaDefinition, wait: bool
    ) -> Txn:
        v.check_key(key, self.config.limits)
        timeout_ms = v.check_timeout(timeout_ms, self.config)
        after = v.check_saga(definition, self.config)
        for step in definition.steps:
            self._check_service(step.service, step.address)
        digest = b""
        if key:
            digest = _digest(
                b"saga", str(timeout_ms).encode(), definition.SerializeToString(deterministic=True)
            )
            existing = self._by_key(key, digest)
            if existing is not None:
                return await self._settled(existing) if wait else existing
        self._check_capacity()
        now = self._clock.now_ms()
        rec = pb.WalSagaStart(
            gid=self._new_gid(now),
            idempotency_key=key,
            request_digest=digest,
            created_unix_ms=now,
            deadline_unix_ms=now + timeout_ms,
            definition=definition,
            resolved_addresses=[
                self._calls.resolve(st.service, st.address) for st in definition.steps
            ],
        )
        txn = self._saga.build(rec, after)
        self._admit(txn)
        self._tel.started(txn)
        rec.traceparent = txn.traceparent
        try:
            txn.lsn = await self._append(RT_SAGA_START, rec, sync=False)
        except BaseException:
            self._forget(txn)
            raise
        if txn.watchers:
            self._publish(txn)
        self._spawn_driver(txn)
        return await self._settled(txn) if wait else txn

    async def cancel_saga(self, gid: str, reason: str) -> Txn:
        txn = self.get(gid)
        if txn.protocol != pb.PROTOCOL_SAGA:
            raise FailedPrecondition(f"transaction {gid} is not a saga (use Abort)")
        if txn.claimed == TxnState.COMPLETED or self._saga.pivot_done(txn):
            raise FailedPrecondition(
                f"saga {gid} is past its pivot ({txn.claimed.name}): it can only go forward"
            )
        if txn.claimed == TxnState.RUNNING:
            txn.reason = txn.reason or reason or "cancelled by the client"
            txn.abort_requested.set()
            if txn.wake is not None:
                txn.wake.set()
        return await self._settled(txn)

    async def retry(self, gid: str) -> Txn:
        txn = self.get(gid)
        if txn.claimed != TxnState.STUCK:
            raise FailedPrecondition(
                f"transaction {gid} is {txn.claimed.name}: only a STUCK saga can be retried"
            )
        self._tel.recovering(txn, "operator retry")
        await self.transition(txn, TxnState.COMPENSATING, reason="retried by an operator")
        for st in txn.steps:
            st.compensation_attempts = 0
        self._spawn_driver(txn)
        return await self._settled(txn)

    async def _settled(self, txn: Txn) -> Txn:
        await txn.decided.wait()
        return txn

    async def log_step(
        self,
        txn: Txn,
        step: StepRt,
        state: BranchState,
        *,
        sync: bool,
        error: str = "",
        result: bytes = b"",
    ) -> None:
        """A saga step's state change: logged (forced for a step start), then applied."""
        rec = pb.WalSagaStep(
            gid=txn.gid,
            step=step.index,
            state=int(state),  # type: ignore[arg-type]
            attempts=step.attempts,
            error=error,
            result=result,
        )
        txn.rec_steps[step.index] = rec
        lsn = await self._append(RT_SAGA_STEP, rec, sync=sync, parent=step.span)
        self._saga.apply_step(step, rec)
        txn.lsn = lsn
        if txn.watchers:
            self._publish(txn)

    # ------------------------------------------------------------------ transitions

    async def transition(
        self,
        txn: Txn,
        new: TxnState,
        *,
        reason: str = "",
        commit_branches: Sequence[str] = (),
    ) -> int:
        """Check the table, log the change, wait for durability, then apply it."""
        old = txn.claimed
        if not allowed(old, new):
            raise IllegalTransition(
                f"transaction {txn.gid}: {old.name} -> {new.name} is not allowed"
            )
        rtype, record, sync = self._record_for(txn, new, reason, commit_branches)
        txn.claimed = new
        try:
            lsn = await self._append(rtype, record, sync=sync, parent=txn.phase_span or txn.span)
        except BaseException:
            txn.claimed = old
            raise
        if old == TxnState.STUCK:
            txn.reason = ""  # an operator's retry starts a new story
        if reason and (not txn.reason or new == TxnState.STUCK):
            txn.reason = reason
        self._set(txn, new, lsn)
        if new.final:
            self._finish(txn)
        self._tel.state_changed(txn, new)
        if txn.watchers:
            self._publish(txn)
        return lsn

    def _record_for(
        self, txn: Txn, new: TxnState, reason: str, commit_branches: Sequence[str]
    ) -> tuple[RecordType, _Record, bool]:
        if txn.protocol == pb.PROTOCOL_SAGA:
            rec_s = pb.WalSagaState(gid=txn.gid, state=int(new), reason=reason)  # type: ignore[arg-type]
            txn.rec_saga_state = rec_s
            return RT_SAGA_STATE, rec_s, False
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
            )
            txn.rec_prepare = rec_p
            # Rides the group commit: written before the first Prepare, not forced.
            return RT_PREPARE, rec_p, False
        if new == TxnState.COMMITTING:
            rec_c = pb.WalCommit(gid=txn.gid, branch_ids=list(commit_branches))
            txn.rec_commit = rec_c
            return RT_COMMIT, rec_c, True  # the one forced record: the decision
        if new == TxnState.ABORTING:
            rec_a = pb.WalAbort(gid=txn.gid, reason=reason)
            txn.rec_abort = rec_a
            return RT_ABORT, rec_a, False  # presumed abort: never forced
        rec_e = pb.WalEnd(gid=txn.gid, state=int(new), reason=reason or txn.reason)  # type: ignore[arg-type]
        txn.rec_end = rec_e
        return RT_END, rec_e, False  # lazy

    async def _append(
        self, rtype: RecordType, record: _Record, *, sync: bool, parent: Span | None = None
    ) -> int:
        """Appends; returns once the record is written (``sync``: fdatasync'ed). A forced
        append gets an ``accord.wal.sync`` span under ``parent`` when tracing."""
        try:
            lsn, done = self._wal.submit(int(rtype), record.SerializeToString(), sync=sync)
        except Exception as e:  # WalFatalError and friends: the log cannot take it
            raise Unavailable(f"cannot make the change durable: {e}") from e
        self._records_since_checkpoint += 1
        if self._records_since_checkpoint >= self.config.checkpoint_every:
            self._maybe_checkpoint()
        span = self._tel.wal_span(parent) if sync else None
        try:
            await done
        except Exception as e:
            raise Unavailable(f"cannot make the change durable: {e}") from e
        finally:
            if span is not None:
                self._tel.wal_done(span, lsn)
        return lsn

    # ------------------------------------------------------------------ driving

    async def _start(self, txn: Txn) -> None:
        """ACTIVE -> PREPARING: resolve instances, log the branch list, start the driver."""
        for b in txn.branches:
            b.resolved = self._calls.resolve(b.service, b.address)
        txn.one_phase = len(txn.branches) == 1
        if txn.expiry is not None:
            txn.expiry.cancel()
            txn.expiry = None
        await self.transition(txn, TxnState.PREPARING)
        self._spawn_driver(txn)

    def _spawn_driver(self, txn: Txn) -> None:
        if txn.driver is not None and not txn.driver.done():
            return
        task = asyncio.get_running_loop().create_task(self._drive(txn), name=f"drive-{txn.gid}")
        txn.driver = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drive(self, txn: Txn) -> None:
        # This task's log lines carry the gid and the transaction's trace.
        bind_gid(txn.gid)
        if txn.span is not None:
            attach_span(txn.span)
        try:
            if txn.protocol == pb.PROTOCOL_SAGA:
                await self._saga.run(txn)
            else:
                await self._twopc.run(txn)
        except Unavailable as e:
            log.error("gid=%s stopped: %s", txn.gid, e)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("gid=%s driver failed", txn.gid)

    async def _outcome(self, txn: Txn) -> Txn:
        """Waits for the decision, then (bounded) for phase two to finish."""
        await txn.decided.wait()
        if not txn.finished.is_set():
            try:
                async with asyncio.timeout(self.config.phase_two_wait_s):
                    await txn.finished.wait()
            except TimeoutError:
                pass  # decided; phase two goes on in the background
        return txn

    def branch_request(
        self, gid: str, branch_id: str, operation: str, payload: bytes, *, one_phase: bool = False
    ) -> pb.BranchRequest:
        """A participant call, with this coordinator's fencing epoch and the address to
        ask for outcomes."""
        cfg = self.config
        return pb.BranchRequest(
            gid=gid,
            branch_id=branch_id,
            operation=operation,
            payload=payload,
            shard=cfg.shard,
            epoch=cfg.epoch,
            coordinator_address=cfg.advertise_address,
            one_phase=one_phase,
        )

    async def call_branch(
        self,
        txn: Txn,
        branch: BranchRt,
        method: str,
        *,
        deadline_ms: int | None,
        one_phase: bool = False,
        stop: asyncio.Event | None = None,
    ) -> CallResult | None:
        """Calls until the participant gives a final answer (OK or NO). Retryable
        answers back off with jitter; returns None when the deadline passes or ``stop``
        is set first."""
        cfg = self.config
        request = self.branch_request(
            txn.gid, branch.branch_id, branch.operation, branch.payload, one_phase=one_phase
        )
        attempt = 0
        while True:
            attempt += 1
            branch.attempts += 1
            timeout = cfg.call_timeout_s
            if deadline_ms is not None:
                left = (deadline_ms - self._clock.now_ms()) / 1000
                if left <= 0:
                    return None
                timeout = min(timeout, left)
            result, branch.resolved = await self.call_participant(
                txn.phase_span or txn.span,
                method,
                branch.service,
                branch.address,
                branch.resolved,
                request,
                timeout,
            )
            if result.verdict != Verdict.RETRY:
                return result
            branch.last_error = result.detail
            delay = cfg.retry.delay(attempt, self._rand())
            if deadline_ms is not None and self._clock.now_ms() + delay * 1000 >= deadline_ms:
                return None
            if stop is not None:
                try:
                    async with asyncio.timeout(delay):
                        await stop.wait()
                    return None
                except TimeoutError:
                    pass
            else:
                await asyncio.sleep(delay)

    async def call_participant(
        self,
        parent: Span | None,
        method: str,
        service: str,
        address: str,
        current: str,
        request: pb.BranchRequest,
        attempt_s: float,
    ) -> tuple[CallResult, str]:
        """One participant call, routed by ``ParticipantCalls.send`` (returns the answer
        and the address for the next attempt): a CLIENT span under ``parent`` (a phase or
        step span) whose context travels in the call's metadata, its latency, and a retry
        event on ``parent`` when the answer is "retry later"."""
        tel = self._tel
        label = service or address
        span = tel.call_span(parent, method, label, request.branch_id)
        t0 = time.monotonic_ns()
        result, following = await self._calls.send(
            method,
            service,
            address,
            current,
            request,
            attempt_s,
            metadata=outgoing_metadata(span),
        )
        tel.call_done(parent, span, method, label, t0, result)
        return result, following

    # ------------------------------------------------------------------ recovery

    def replay(self, checkpoint: bytes | None, records: Sequence[tuple[int, int, bytes]]) -> None:
        """Rebuilds every transaction from a checkpoint image and the records after it.
        Call before serving; then :meth:`resume` drives the unfinished ones."""
        if checkpoint:
            image = pb.CheckpointImage.FromString(checkpoint)
            for entry in image.transactions:
                lsn = image.lsn
                if entry.HasField("begin"):
                    self._apply(RT_BEGIN, entry.begin, lsn)
                if entry.HasField("prepare"):
                    self._apply(RT_PREPARE, entry.prepare, lsn)
                if entry.HasField("commit"):
                    self._apply(RT_COMMIT, entry.commit, lsn)
                if entry.HasField("abort"):
                    self._apply(RT_ABORT, entry.abort, lsn)
                if entry.HasField("end"):
                    self._apply(RT_END, entry.end, lsn)
                if entry.HasField("saga"):
                    self._apply(RT_SAGA_START, entry.saga, lsn)
                    for step in entry.steps:
                        self._apply(RT_SAGA_STEP, step, lsn)
                if entry.HasField("saga_state"):
                    self._apply(RT_SAGA_STATE, entry.saga_state, lsn)
        for lsn, rtype, payload in records:
            kind = RecordType(rtype)
            self._apply(kind, kind.decode(payload), lsn)

    async def replay_yielding(
        self,
        checkpoint: bytes | None,
        records: Sequence[tuple[int, int, bytes]],
        *,
        every: int = REPLAY_CHUNK,
    ) -> None:
        """As :meth:`replay`, giving the event loop a turn every ``every`` records: a
        long log (100 000 records replay in about 3 s) must not starve the shard lease's
        keepalive, or the coordinator loses its shard before it serves."""
        self.replay(checkpoint, ())
        for start in range(0, len(records), every):
            self.replay(None, records[start : start + every])
            await asyncio.sleep(0)

    def _apply(self, rtype: RecordType, rec: _Record, lsn: int) -> None:
        gid: str = rec.gid
        txn = self._txns.get(gid)
        if isinstance(rec, pb.WalSagaStart):
            if txn is None:
                txn = self._saga.build(rec)
                self._admit(txn)
            txn.traceparent = rec.traceparent
            txn.lsn = lsn
            return
        if rtype in (RT_BEGIN, RT_PREPARE):
            assert isinstance(rec, pb.WalBegin | pb.WalPrepare)
            if txn is None:
                txn = Txn(gid=gid)
                self._admit(txn)
            txn.key = rec.idempotency_key
            txn.digest = rec.request_digest
            txn.created_ms = rec.created_unix_ms
            txn.deadline_ms = rec.deadline_unix_ms
            txn.traceparent = rec.traceparent or txn.traceparent
            if isinstance(rec, pb.WalBegin):
                txn.rec_begin = rec
            else:
                txn.rec_prepare = rec
                txn.one_phase = rec.one_phase
                txn.branches = [
                    BranchRt(
                        branch_id=b.branch_id,
                        service=b.service,
                        address=b.address,
                        operation=b.operation,
                        payload=b.payload,
                        resolved=rec.resolved_addresses[i]
                        if i < len(rec.resolved_addresses)
                        else "",
                    )
                    for i, b in enumerate(rec.branches)
                ]
                self._set(txn, TxnState.PREPARING, lsn)
            if txn.key:
                self._keys[txn.key] = gid
            txn.lsn = lsn
            return
        if txn is None:
            log.warning("WAL record %s at lsn %d for unknown gid %s ignored", rtype.name, lsn, gid)
            return
        if isinstance(rec, pb.WalCommit):
            txn.rec_commit = rec
            self._set(txn, TxnState.COMMITTING, lsn)
        elif isinstance(rec, pb.WalAbort):
            txn.rec_abort = rec
            txn.reason = txn.reason or rec.reason
            self._set(txn, TxnState.ABORTING, lsn)
        elif isinstance(rec, pb.WalSagaStep):
            step = txn.steps[rec.step]
            txn.rec_steps[rec.step] = rec
            self._saga.apply_step(step, rec)
            txn.lsn = lsn
        elif isinstance(rec, pb.WalSagaState):
            txn.rec_saga_state = rec
            txn.reason = rec.reason or txn.reason
            self._set(txn, TxnState(rec.state), lsn)
            if txn.state.final:
                self._finish(txn)
        elif isinstance(rec, pb.WalEnd):
            txn.rec_end = rec
            txn.reason = txn.reason or rec.reason
            self._set(txn, TxnState(rec.state), lsn)
            self._finish(txn)

    @staticmethod
    def _set(txn: Txn, state: TxnState, lsn: int) -> None:
        txn.state = txn.claimed = state
        txn.lsn = lsn
        if state.decided:
            txn.decided.set()
        elif txn.decided.is_set():  # a STUCK saga retried by an operator
            txn.decided = asyncio.Event()
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

    async def resume(self) -> int:
        """Drives every unfinished transaction to its end, through the live code path."""
        unfinished = [self._txns[g] for g in sorted(self._live)]
        for txn in unfinished:
            if txn.state != TxnState.STUCK:
                self._tel.recovering(txn)
            if txn.protocol == pb.PROTOCOL_SAGA:
                if txn.state != TxnState.STUCK:  # STUCK waits for an operator
                    self._spawn_driver(txn)
                continue
            if txn.state == TxnState.ACTIVE:
                await self.transition(
                    txn, TxnState.ABORTING, reason="coordinator restarted before Commit"
                )
            elif txn.state == TxnState.PREPARING and not txn.one_phase:
                await self.transition(
                    txn,
                    TxnState.ABORTING,
                    reason="coordinator restarted before a decision (presumed abort)",
                )
            self._spawn_driver(txn)
        if unfinished:
            log.info("recovery: driving %d unfinished transactions", len(unfinished))
        return len(unfinished)

    # ------------------------------------------------------------------ bookkeeping

    def _admit(self, txn: Txn) -> None:
        self._txns[txn.gid] = txn
        self._live.add(txn.gid)
        if txn.key:
            self._keys[txn.key] = txn.gid

    def _forget(self, txn: Txn) -> None:
        self._txns.pop(txn.gid, None)
        self._live.discard(txn.gid)
        if txn.key and self._keys.get(txn.key) == txn.gid:
            del self._keys[txn.key]

    def _finish(self, txn: Txn) -> None:
        txn.finished.set()
        txn.decided.set()
        if txn.expiry is not None:
            txn.expiry.cancel()
            txn.expiry = None
        self._live.discard(txn.gid)
        self._finished[txn.gid] = None
        while len(self._finished) > self.config.retain_finished:
            old, _ = self._finished.popitem(last=False)
            gone = self._txns.pop(old, None)
            if gone is not None and gone.key and self._keys.get(gone.key) == old:
                del self._keys[gone.key]

    def _by_key(self, key: str, digest: bytes) -> Txn | None:
        gid = self._keys.get(key)
        if gid is None:
            return None
        txn = self._txns[gid]
        if txn.digest != digest:
            raise AlreadyExists(
                f"idempotency key {key!r} was used for a different request (transaction {gid})"
            )
        return txn

    def _check_capacity(self) -> None:
        if len(self._live) >= self.config.limits.max_inflight:
            raise ResourceExhausted(
                f"{len(self._live)} transactions in flight (limit {self.config.limits.max_inflight})"
            )

    def _check_service(self, service: str, address: str) -> None:
        if not address and not self._calls.known(service):
            raise Unavailable(
                f"no live instance of participant service {service!r} is known "
                f"(registry: {self._calls.describe()})"
            )

    @staticmethod
    def _branch_rt(branch: pb.Branch, index: int) -> BranchRt:
        return BranchRt(
            branch_id=branch.branch_id or f"b{index + 1}",
            service=branch.service,
            address=branch.address,
            operation=branch.operation,
            payload=branch.payload,
        )

    def _new_gid(self, now_ms: int) -> str:
        # The shard first, so any client can route the gid (common/gid.py); then,
        # time-ordered and unique across restarts: start time, a random per-process
        # prefix, a counter. (An os.urandom call per transaction showed up in profiles.)
        self._gid_seq += 1
        return f"{self._gid_shard}{now_ms:012x}{self._gid_prefix}{self._gid_seq:08x}"

    def _arm_expiry(self, txn: Txn) -> None:
        delay = max(0.0, (txn.deadline_ms - self._clock.now_ms()) / 1000)
        txn.expiry = asyncio.get_running_loop().call_later(delay, self._expire, txn)

    def _expire(self, txn: Txn) -> None:
        txn.expiry = None
        if txn.claimed != TxnState.ACTIVE:
            return

        async def expire() -> None:
            try:
                await self.transition(
                    txn, TxnState.ABORTING, reason="deadline passed before Commit"
                )
            except IllegalTransition:
                return
            self._spawn_driver(txn)

        task = asyncio.get_running_loop().create_task(expire())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _event(self, txn: Txn) -> pb.TransactionEvent:
        return pb.TransactionEvent(
            gid=txn.gid,
            lsn=txn.lsn,
            state=int(txn.state),  # type: ignore[arg-type]
            unix_ms=self._clock.now_ms(),
            transaction=txn.to_pb(),
        )

    def _publish(self, txn: Txn) -> None:
        event = self._event(txn)
        for q in list(txn.watchers):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:
                txn.watchers.remove(q)  # a watcher too slow to keep up is dropped
                while not q.empty():
                    q.get_nowait()
                q.put_nowait(None)

    def _maybe_checkpoint(self) -> None:
        if self._checkpointing or self._closed:
            return
        self._checkpointing = True
        self._records_since_checkpoint = 0
        # The image must reflect every record up to `lsn`: records are attached to their
        # transaction when submitted, and nothing awaits between here and the snapshot.
        lsn = self._wal.last_lsn
        entries = [self._txns[g].checkpoint_entry() for g in self._live]
        entries += [self._txns[g].checkpoint_entry() for g in self._finished if self._txns[g].key]
        image = pb.CheckpointImage(lsn=lsn, transactions=entries).SerializeToString()

        async def run() -> None:
            try:
                await self._wal.checkpoint(image, lsn)
                log.info("checkpoint at lsn %d: %d transactions", lsn, len(entries))
            except Exception:
                log.exception("checkpoint at lsn %d failed", lsn)
            finally:
                self._checkpointing = False

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for txn in self._txns.values():
            if txn.expiry is not None:
                txn.expiry.cancel()
            if txn.span is not None:
                self._tel.closing(txn)


_Record = Record
