"""The transaction engine: one engine for every protocol.

The engine owns persistence (the WAL), timers, retries (:meth:`Engine.call`, the one
retry loop), idempotency keys and recovery; the transaction table (``_table``), replay
(``_replay``) and watchers (``_watch``) are its parts. A protocol is a mode
(``_host.Mode``: 2PC in ``_twopc``, sagas in ``_saga``), found in a table keyed by
protocol; a mode decides which branch gets which call next and which state follows,
and reaches the engine only through ``_host.Host``.

Every state change goes through :meth:`Engine.transition`: check the state table, append
the mode's record, wait until it is durable, then change memory and tell anyone.
Recovery rebuilds the transactions from the WAL and hands every unfinished one to the
same driver that runs live ones. The API takes plain values (``_specs``), never protobuf:
the gRPC edge converts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from opentelemetry.trace import Span

import accord.v1 as pb
from accord.common.gid import gid_prefix, shard_of
from accord.common.retry import pause
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
from accord.coordinator._host import CallPolicy, CallTarget, Clock, Mode, SystemClock
from accord.coordinator._methods import Method
from accord.coordinator._model import BranchRt, Txn
from accord.coordinator._records import Record, RecordType
from accord.coordinator._replay import Replay
from accord.coordinator._saga import SagaMode
from accord.coordinator._specs import BranchSpec, SagaSpec, branch_to_pb, saga_to_pb
from accord.coordinator._states import Outcome, TxnState, allowed
from accord.coordinator._table import TxnTable
from accord.coordinator._telemetry import CoordinatorTelemetry
from accord.coordinator._twopc import TwoPhaseCommit
from accord.coordinator._watch import Watchers

__all__ = ["Caller", "Clock", "Engine", "SystemClock", "WalLike"]

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


class Caller(Protocol):
    """What the engine needs to reach participants (``ParticipantCalls``)."""

    def resolve(self, service: str, address: str) -> str: ...

    def known(self, service: str) -> bool: ...

    def describe(self) -> str: ...

    async def send(
        self,
        method: Method,
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


def _ignore_outcome(done: asyncio.Future[None]) -> None:
    """Retrieves a not-awaited append's failure (the WAL has already stopped on it)."""
    if not done.cancelled():
        done.exception()


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(len(p).to_bytes(4, "little"))
        h.update(p)
    return h.digest()


class Engine:
    """Implements :class:`~accord.coordinator._host.Host` for its modes."""

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
        self._config = config or CoordinatorConfig()
        self._clock = clock or SystemClock()
        self._failpoints = failpoints or Failpoints()
        self._rand = rand
        limits = self._config.limits
        self.table = TxnTable(
            retain_finished=self._config.retain_finished,
            max_inflight=limits.max_inflight,
            max_inflight_per_caller=limits.max_inflight_per_caller,
        )
        self._tel = telemetry or CoordinatorTelemetry()
        self._tel.bind(self.table)
        self._watchers = Watchers(
            clock=self._clock, queue_size=limits.watch_queue, max_watchers=limits.max_watchers
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._records_since_checkpoint = 0
        self._checkpointing = False
        self._closed = False
        # ValueError for a shard name a gid cannot carry (the CLI checks it first).
        self._gid_shard = gid_prefix(self._config.shard)
        self._gid_prefix = os.urandom(4).hex()
        self._gid_seq = 0
        self._twopc = TwoPhaseCommit(self)
        self._saga = SagaMode(self)
        #: The modes, by ``accord.v1.Protocol``: the only place protocols are told apart.
        self._modes: dict[int, Mode] = {m.protocol: m for m in (self._twopc, self._saga)}
        self._replay = Replay(
            self.table, self._modes.values(), enter=self._enter, finish=self._finish
        )

    # ------------------------------------------------------------------ host

    @property
    def config(self) -> CoordinatorConfig:
        return self._config

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def failpoints(self) -> Failpoints:
        return self._failpoints

    @property
    def telemetry(self) -> CoordinatorTelemetry:
        return self._tel

    # ------------------------------------------------------------------ queries

    def get(self, gid: str, *, caller: str | None = None) -> Txn:
        """The transaction; with ``caller``, only when that caller started it (or the
        caller "", anyone's): another caller's is NOT_FOUND, exactly as an unknown gid,
        so gids cannot be probed."""
        txn = self.table.find(_checked_gid(gid))
        if txn is None or (caller is not None and txn.caller not in ("", caller)):
            self._check_shard(gid)
            raise NotFound(f"unknown transaction {gid!r}")
        return txn

    def _check_shard(self, gid: str) -> None:
        """FAILED_PRECONDITION for an unknown gid made by another shard: it may well
        exist there, so "not found" (or, to a participant, "presumed aborted") would be
        wrong. The message names the owning shard, for a client to route by."""
        shard = shard_of(gid)
        if shard and shard != self._config.shard:
            raise FailedPrecondition(
                f"transaction {gid} belongs to shard {shard}; this coordinator owns shard "
                f"{self._config.shard}: send it to the owner of shard {shard}"
            )

    def _get_for(self, gid: str, mode: Mode) -> Txn:
        """The transaction, when ``mode`` drives it (a call of that protocol's API)."""
        txn = self.get(gid)
        other = self._modes[txn.protocol]
        if other is not mode:
            raise FailedPrecondition(f"transaction {gid} {other.misuse}")
        return txn

    @property
    def inflight(self) -> int:
        return self.table.inflight

    def list(
        self,
        states: Sequence[TxnState],
        limit: int,
        page_token: str,
        *,
        caller: str | None = None,
    ) -> tuple[list[Txn], str]:
        """A page of transactions (``caller``: only that caller's, see :meth:`get`)."""
        return self.table.page(states, limit, page_token, caller=caller)

    def query_outcome(self, gid: str) -> Outcome:
        txn = self.table.find(_checked_gid(gid))
        if txn is None:
            # Only this shard's gids can be presumed aborted; another shard's is a
            # misdirected question (answered "not yet": the participant asks again).
            self._check_shard(gid)
            # Recovery has finished before the server answers anything: a gid we do not
            # know was never decided to commit (presumed abort).
            return Outcome.ABORTED
        if txn.state in (TxnState.COMMITTING, TxnState.COMMITTED):
            return Outcome.COMMITTED
        if txn.state in (TxnState.ABORTING, TxnState.ABORTED):
            return Outcome.ABORTED
        return Outcome.IN_PROGRESS

    def watch(self, gid: str, *, caller: str | None = None) -> AsyncIterator[pb.TransactionEvent]:
        """The transaction's state now, then every durable change (NOT_FOUND at once for
        an unknown gid, or another caller's)."""
        return self._watchers.watch(self.get(gid, caller=caller))

    # ------------------------------------------------------------------ 2PC API

    async def begin(self, *, key: str, timeout_ms: int, caller: str = "") -> Txn:
        v.check_key(key, self._config.limits)
        timeout_ms = v.check_timeout(timeout_ms, self._config)
        digest = _digest(b"begin", str(timeout_ms).encode())
        if key:
            existing = self.table.by_key(key, digest, caller)
            if existing is not None:
                return existing
        self.table.check_capacity(caller)
        now = self._clock.now_ms()
        txn = Txn(gid=self._new_gid(now), key=key, digest=digest, caller=caller, created_ms=now)
        txn.deadline_ms = now + timeout_ms
        self._tel.started(txn)
        rec = pb.WalBegin(
            gid=txn.gid,
            idempotency_key=key,
            request_digest=digest,
            created_unix_ms=now,
            deadline_unix_ms=txn.deadline_ms,
            traceparent=txn.traceparent,
            caller=caller,
        )
        self.table.admit(txn)
        txn.rec_begin = rec
        lsn = await self.append(RecordType.BEGIN, rec, sync=False)
        txn.lsn = lsn
        self._arm_expiry(txn)
        return txn

    async def enlist(self, gid: str, branch: BranchSpec) -> str:
        txn = self._get_for(gid, self._twopc)
        v.check_branch(branch, self._config.limits)
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
        limits = self._config.limits
        if len(txn.branches) >= limits.max_branches:
            raise ResourceExhausted(
                f"transaction {gid} already has {len(txn.branches)} branches "
                f"(limit {limits.max_branches})"
            )
        # Nothing is logged yet: no participant has heard of this branch, so a crash
        # before Commit loses nothing that would need undoing (presumed abort).
        txn.branches.append(new)
        return new.branch_id

    async def commit(self, gid: str) -> Txn:
        txn = self._get_for(gid, self._twopc)
        if txn.claimed == TxnState.ACTIVE:
            # Losing a race with Abort or another Commit is fine: report the outcome.
            with contextlib.suppress(IllegalTransition):
                await self._start(txn)
        return await self._outcome(txn)

    async def abort(self, gid: str, reason: str) -> Txn:
        v.check_reason(reason, self._config.limits)
        txn = self._get_for(gid, self._twopc)
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

    async def execute(
        self, *, key: str, timeout_ms: int, branches: Sequence[BranchSpec], caller: str = ""
    ) -> Txn:
        limits = self._config.limits
        v.check_key(key, limits)
        timeout_ms = v.check_timeout(timeout_ms, self._config)
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
                *(branch_to_pb(b).SerializeToString(deterministic=True) for b in branches),
            )
            existing = self.table.by_key(key, digest, caller)
            if existing is not None:
                return await self._outcome(existing)
        self.table.check_capacity(caller)
        now = self._clock.now_ms()
        txn = Txn(gid=self._new_gid(now), key=key, digest=digest, caller=caller, created_ms=now)
        txn.deadline_ms = now + timeout_ms
        txn.branches = rts
        self.table.admit(txn)
        self._tel.started(txn)
        try:
            await self._start(txn)
        except BaseException:
            if txn.claimed == TxnState.ACTIVE:
                self.table.forget(txn)
                self._tel.closing(txn)
            raise
        return await self._outcome(txn)

    # ------------------------------------------------------------------ saga API

    async def start_saga(
        self, *, key: str, timeout_ms: int, definition: SagaSpec, wait: bool, caller: str = ""
    ) -> Txn:
        v.check_key(key, self._config.limits)
        timeout_ms = v.check_timeout(timeout_ms, self._config)
        after = v.check_saga(definition, self._config)
        for step in definition.steps:
            self._check_service(step.service, step.address)
        wire = saga_to_pb(definition)
        digest = b""
        if key:
            digest = _digest(
                b"saga", str(timeout_ms).encode(), wire.SerializeToString(deterministic=True)
            )
            existing = self.table.by_key(key, digest, caller)
            if existing is not None:
                return await self._settled(existing) if wait else existing
        self.table.check_capacity(caller)
        now = self._clock.now_ms()
        rec = pb.WalSagaStart(
            gid=self._new_gid(now),
            idempotency_key=key,
            request_digest=digest,
            created_unix_ms=now,
            deadline_unix_ms=now + timeout_ms,
            definition=wire,
            resolved_addresses=[
                self._calls.resolve(st.service, st.address) for st in definition.steps
            ],
            caller=caller,
        )
        txn = self._saga.build(rec, definition, after)
        self.table.admit(txn)
        self._tel.started(txn)
        rec.traceparent = txn.traceparent
        try:
            # Forced: the definition is what a restart compensates from, so it is on
            # disk before the first action is sent (and before a no-wait caller gets
            # the gid); the step records after it only ride the group commit.
            txn.lsn = await self.append(RecordType.SAGA_START, rec, sync=True)
        except BaseException:
            self.table.forget(txn)
            raise
        if txn.watchers:
            self.publish(txn)
        self._spawn_driver(txn)
        return await self._settled(txn) if wait else txn

    async def cancel_saga(self, gid: str, reason: str) -> Txn:
        v.check_reason(reason, self._config.limits)
        txn = self._get_for(gid, self._saga)
        self._saga.cancel(txn, reason)
        return await self._settled(txn)

    async def retry(self, gid: str) -> Txn:
        txn = self.get(gid)
        if txn.claimed != TxnState.STUCK:
            raise FailedPrecondition(
                f"transaction {gid} is {txn.claimed.name}: only a STUCK saga can be retried"
            )
        await self._saga.retry(txn)
        self._spawn_driver(txn)
        return await self._settled(txn)

    async def _settled(self, txn: Txn) -> Txn:
        await txn.decided.wait()
        return txn

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
        mode = self._modes[txn.protocol]
        rtype, record, sync = mode.record(txn, new, reason, commit_branches)
        txn.claimed = new
        try:
            lsn = await self.append(rtype, record, sync=sync, parent=txn.phase_span or txn.span)
        except BaseException:
            txn.claimed = old
            raise
        if old == TxnState.STUCK:
            txn.reason = ""  # an operator's retry starts a new story
        if reason and (not txn.reason or new == TxnState.STUCK):
            txn.reason = reason
        self._enter(txn, new, lsn, mode)
        if new.final:
            self._finish(txn)
        self._tel.state_changed(txn, new)
        if txn.watchers:
            self.publish(txn)
        return lsn

    def _enter(self, txn: Txn, state: TxnState, lsn: int, mode: Mode | None = None) -> None:
        """Memory follows a durable (or replayed) state change."""
        txn.state = txn.claimed = state
        txn.lsn = lsn
        if state.decided:
            txn.decided.set()
        elif txn.decided.is_set():  # a STUCK saga retried by an operator
            txn.decided = asyncio.Event()
        (mode or self._modes[txn.protocol]).entered(txn, state)

    def _finish(self, txn: Txn) -> None:
        if txn.expiry is not None:
            txn.expiry.cancel()
            txn.expiry = None
        self.table.finish(txn)

    async def append(
        self, rtype: RecordType, record: Record, *, sync: bool, parent: Span | None = None
    ) -> int:
        """Appends; returns once the record is written (``sync``: fdatasync'ed). A forced
        append gets an ``accord.wal.sync`` span under ``parent`` when tracing."""
        lsn, done = self._submit(rtype, record, sync=sync)
        span = self._tel.wal_span(parent) if sync else None
        try:
            await done
        except Exception as e:
            raise Unavailable(f"cannot make the change durable: {e}") from e
        finally:
            if span is not None:
                self._tel.wal_done(span, lsn)
        return lsn

    def append_later(self, rtype: RecordType, record: Record) -> int:
        """Appends without waiting: the record joins the next group commit, behind every
        record submitted before it (a crash keeps a prefix of the log, so a later record
        found on disk means this one is there too). Returns its LSN. A write that fails
        later is the WAL's fail-stop (the coordinator exits); nobody waits for it here."""
        lsn, done = self._submit(rtype, record, sync=False)
        done.add_done_callback(_ignore_outcome)
        return lsn

    def _submit(
        self, rtype: RecordType, record: Record, *, sync: bool
    ) -> tuple[int, asyncio.Future[None]]:
        """Hands the record to the WAL (stamped with the feed's event time,
        FeedEvent.unix_ms) and counts it towards the next checkpoint."""
        record.unix_ms = self._clock.now_ms()
        try:
            lsn, done = self._wal.submit(int(rtype), record.SerializeToString(), sync=sync)
        except Exception as e:  # WalFatalError and friends: the log cannot take it
            raise Unavailable(f"cannot make the change durable: {e}") from e
        self._records_since_checkpoint += 1
        if self._records_since_checkpoint >= self._config.checkpoint_every:
            self._maybe_checkpoint()
        return lsn, done

    def publish(self, txn: Txn) -> None:
        self._watchers.publish(txn)

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
            await self._modes[txn.protocol].run(txn)
        except Unavailable as e:
            log.error("event=driver_stopped gid=%s error=%r", txn.gid, str(e))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("event=driver_failed gid=%s", txn.gid)

    async def _outcome(self, txn: Txn) -> Txn:
        """Waits for the decision, then (bounded) for phase two to finish."""
        await txn.decided.wait()
        if not txn.finished.is_set():
            try:
                async with asyncio.timeout(self._config.phase_two_wait_s):
                    await txn.finished.wait()
            except TimeoutError:
                pass  # decided; phase two goes on in the background
        return txn

    def request(
        self, gid: str, branch_id: str, operation: str, payload: bytes, *, one_phase: bool = False
    ) -> pb.BranchRequest:
        """A participant call, with this coordinator's fencing epoch and the address to
        ask for outcomes."""
        cfg = self._config
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

    async def call(
        self,
        txn: Txn,
        target: CallTarget,
        method: Method,
        request: pb.BranchRequest,
        policy: CallPolicy,
        *,
        parent: Span | None,
        deadline_ms: int | None = None,
        stop: asyncio.Event | None = None,
        forever: Callable[[], bool] | None = None,
    ) -> CallResult | None:
        """The one retry loop: calls until the participant's answer is final (OK, or a
        "no" under ``policy``). Each attempt is routed by ``ParticipantCalls.send`` (which
        gives the address for the next one) under a CLIENT span of ``parent`` whose
        context travels in the call's metadata; "retry later" backs off on
        ``policy.backoff``. None when the attempts run out, ``deadline_ms`` passes or
        ``stop`` is set first; ``forever()`` True lifts the attempt limit and makes a "no"
        one more reason to retry."""
        tel = self._tel
        clock = self._clock
        service = target.service
        address = target.address
        label = service or address
        attempt = 0
        while True:
            attempt += 1
            target.attempted(method)
            timeout = policy.attempt_s
            if deadline_ms is not None:
                left = (deadline_ms - clock.now_ms()) / 1000
                if left <= 0:
                    return None
                timeout = min(timeout, left)
            span = tel.call_span(parent, method, label, request.branch_id)
            t0 = time.monotonic_ns()
            result, target.resolved = await self._calls.send(
                method,
                service,
                address,
                target.resolved,
                request,
                timeout,
                metadata=outgoing_metadata(span),
            )
            tel.call_done(parent, span, method, label, t0, result)
            target.answered(method, result)
            verdict = result.verdict
            if verdict is Verdict.OK:
                return result
            refused = verdict is Verdict.NO or (
                bool(policy.final_codes) and result.code.name in policy.final_codes
            )
            if verdict is Verdict.RETRY or policy.no_is_error:
                target.last_error = result.detail
            endless = forever is not None and forever()
            if refused and policy.no_is_final and not endless:
                return result
            if policy.max_attempts and attempt >= policy.max_attempts and not endless:
                return None
            if refused and endless:
                log.error(
                    "event=refused_retrying gid=%s branch=%s method=%s detail=%r",
                    txn.gid,
                    request.branch_id,
                    method,
                    result.detail,
                )
            delay = policy.backoff.delay(attempt, self._rand())
            if deadline_ms is not None and clock.now_ms() + delay * 1000 >= deadline_ms:
                return None
            if await pause(delay, stop):
                return None

    # ------------------------------------------------------------------ recovery

    def replay(self, checkpoint: bytes | None, records: Sequence[tuple[int, int, bytes]]) -> None:
        """Rebuilds every transaction from a checkpoint image and the records after it.
        Call before serving; then :meth:`resume` drives the unfinished ones."""
        if checkpoint:
            self._replay.checkpoint(checkpoint)
        self._replay.records(records)

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

    async def resume(self) -> int:
        """Drives every unfinished transaction to its end, through the live code path;
        each mode says first what recovery does (2PC: presumed abort)."""
        unfinished = self.table.unfinished()
        for txn in unfinished:
            if await self._modes[txn.protocol].recover(txn):
                self._spawn_driver(txn)
        if unfinished:
            log.info("event=recovery unfinished=%d", len(unfinished))
        return len(unfinished)

    # ------------------------------------------------------------------ bookkeeping

    def _check_service(self, service: str, address: str) -> None:
        if not address and not self._calls.known(service):
            raise Unavailable(
                f"no live instance of participant service {service!r} is known "
                f"(registry: {self._calls.describe()})"
            )

    @staticmethod
    def _branch_rt(branch: BranchSpec, index: int) -> BranchRt:
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

    def _maybe_checkpoint(self) -> None:
        if self._checkpointing or self._closed:
            return
        self._checkpointing = True
        self._records_since_checkpoint = 0
        # The image must reflect every record up to `lsn`: records are attached to their
        # transaction when submitted, and nothing awaits between here and the snapshot.
        lsn = self._wal.last_lsn
        entries = self.table.checkpoint_entries()
        image = pb.CheckpointImage(lsn=lsn, transactions=entries).SerializeToString()

        async def run() -> None:
            try:
                await self._wal.checkpoint(image, lsn)
                log.info("event=checkpoint lsn=%d transactions=%d", lsn, len(entries))
            except Exception:
                log.exception("event=checkpoint_failed lsn=%d", lsn)
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
        for txn in self.table.all():
            if txn.expiry is not None:
                txn.expiry.cancel()
            if txn.span is not None:
                self._tel.closing(txn)
