"""The shard's event feed (``Coordinator/Subscribe``): the WAL, record by record, in
public types.

The feed IS the log: each durable engine record becomes one ``FeedEvent`` at its LSN
(:func:`record_event`; the WAL's own CHECKPOINT records make none). Nothing is sent
before its record is durable: the WAL's group-commit writer hands every batch to the
:class:`FeedHub` only after the fdatasync that covers it (``FeedSink.durable``), so a
record written but lost in a power loss is never seen by anyone.

Live path: the writer's hand-over is an append and a wake-up per subscriber, nothing at
all without subscribers; a batch's records are decoded into events once, by the first
subscriber that sends them, and shared. Each subscriber has a bounded buffer
(:data:`SUB_MAX_BATCHES` batches and :data:`SUB_MAX_EVENTS` records): one that is full
(a slow reader, a slow network) is dropped from the live path without ever making the
writer wait, and catches up from the segment files on disk (``wal.LogReader``: framed,
CRC-checked, only up to the durable LSN) until it reaches the live edge, where it joins
the live path again. Events go out in LSN order with no gap; a subscriber resuming
from LSN L gets only events above L.

A start LSN whose segment a checkpoint removed (or a catch-up whose next segment a
checkpoint removed under it) is served from the live checkpoint's image: one SNAPSHOT
event per transaction the image holds (its whole ``Transaction``, as GetTransaction
would show it after a restart), all at the checkpoint's LSN, then one SNAPSHOT_END,
then the records after the checkpoint's LSN.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Final

import accord.v1 as pb
from accord.coordinator._config import CoordinatorConfig
from accord.coordinator._errors import (
    AccordError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from accord.coordinator._records import RecordType
from accord.coordinator._telemetry import CoordinatorTelemetry
from accord.coordinator.wal import (
    FIRST_USER_RTYPE,
    LogReader,
    RecordsGone,
    WalError,
    read_live_image,
)

log = logging.getLogger("accord.coordinator.feed")

#: A subscriber's live buffer: at most this many group-commit batches ...
SUB_MAX_BATCHES: Final = 64
#: ... holding at most this many records. Past either, it catches up from disk.
SUB_MAX_EVENTS: Final = 8192
#: Events per SubscribeResponse when the request says 0, and the most it may ask for.
DEFAULT_MAX_BATCH: Final = 512
MAX_MAX_BATCH: Final = 4096
#: A response holds at most this many bytes of events (unless one event is larger):
#: gRPC's message limit on both sides is 4 MiB (accord.common.transport).
MAX_RESPONSE_BYTES: Final = 1024 * 1024
#: Checkpoint files replaced while a snapshot reads them: tries before giving up.
_SNAPSHOT_TRIES: Final = 5

K = pb.FeedEventKind
_2PC = pb.PROTOCOL_TWO_PHASE_COMMIT
_SAGA = pb.PROTOCOL_SAGA
#: A step record's state -> the saga's state when it was written.
_STEP_SAGA_STATE = {
    pb.BRANCH_STATE_COMPENSATING: pb.TXN_STATE_COMPENSATING,
    pb.BRANCH_STATE_COMPENSATED: pb.TXN_STATE_COMPENSATING,
}


class OutOfRange(AccordError):
    """A from_lsn past the durable end of the log (OUT_OF_RANGE: it may become valid)."""


# --------------------------------------------------------------------- records -> events


def trace_id_of(traceparent: str) -> str:
    """The 32 hex digits of a W3C traceparent ("" when there is none)."""
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


_BEGUN = int(K.FEED_EVENT_KIND_BEGUN)
_PREPARING = int(K.FEED_EVENT_KIND_PREPARING)
_COMMIT = int(K.FEED_EVENT_KIND_COMMIT)
_ABORT = int(K.FEED_EVENT_KIND_ABORT)
_ENDED = int(K.FEED_EVENT_KIND_ENDED)
_SAGA_STARTED = int(K.FEED_EVENT_KIND_SAGA_STARTED)
_STEP = int(K.FEED_EVENT_KIND_STEP)
_SAGA_STATE = int(K.FEED_EVENT_KIND_SAGA_STATE)
_PENDING = int(pb.BRANCH_STATE_PENDING)


# One function per record type; each builds the event in one constructor call (setting
# fields one by one on a protobuf message costs several times more).
def _begun(shard: str, lsn: int, payload: bytes) -> pb.FeedEvent:
    r = pb.WalBegin.FromString(payload)
    return pb.FeedEvent(
        shard=shard,
        lsn=lsn,
        kind=_BEGUN,  # type: ignore[arg-type]
        gid=r.gid,
        protocol=_2PC,
        state=pb.TXN_STATE_ACTIVE,
        unix_ms=r.unix_ms,
        idempotency_key=r.idempotency_key,
        created_unix_ms=r.created_unix_ms,
        deadline_unix_ms=r.deadline_unix_ms,
        trace_id=trace_id_of(r.traceparent),
    )


def _preparing(shard: str, lsn: int, payload: bytes) -> pb.FeedEvent:
    r = pb.WalPrepare.FromString(payload)
    resolved = r.resolved_addresses
    e = pb.FeedEvent(
        shard=shard,
        lsn=lsn,
        kind=_PREPARING,  # type: ignore[arg-type]
        gid=r.gid,
        protocol=_2PC,
        state=pb.TXN_STATE_PREPARING,
        unix_ms=r.unix_ms,
        idempotency_key=r.idempotency_key,
        created_unix_ms=r.created_unix_ms,
        deadline_unix_ms=r.deadline_unix_ms,
        trace_id=trace_id_of(r.traceparent),
        one_phase=r.one_phase,
        resolved_addresses=resolved,
    )
    n = len(resolved)
    add = e.branches.add
    for i, b in enumerate(r.branches):
        # add() then CopyFrom: half the cost of BranchStatus(branch=b) objects.
        status = add(state=_PENDING, resolved_address=resolved[i] if i < n else "")
        status.branch.CopyFrom(b)
    return e


def _commit(shard: str, lsn: int, payload: bytes) -> pb.FeedEvent:
    r = pb.WalCommit.FromString(payload)
    return pb.FeedEvent(
        shard=shard,
        lsn=lsn,
        kind=_COMMIT,  # type: ignore[arg-type]
        gid=r.gid,
        protocol=_2PC,
        state=pb.TXN_STATE_COMMITTING,
        unix_ms=r.unix_ms,
        commit_branch_ids=r.branch_ids,
    )


def _abort(shard: str, lsn: int, payload: bytes) -> pb.FeedEvent:
    r = pb.WalAbort.FromString(payload)
    return pb.FeedEvent(
        shard=shard,
        lsn=lsn,
        kind=_ABORT,  # type: ignore[arg-type]
        gid=r.gid,
        protocol=_2PC,
        state=pb.TXN_STATE_ABORTING,
        unix_ms=r.unix_ms,
        reason=r.reason,
    )


def _ended(shard: str, lsn: int, payload: bytes) -> pb.FeedEvent:
    r = pb.WalEnd.FromString(payload)
    return pb.FeedEvent(
        shard=shard,
        lsn=lsn,
        kind=_ENDED,  # type: ignore[arg-type]
        gid=r.gid,
        protocol=_2PC,
        state=r.state,
        unix_ms=r.unix_ms,
        reason=r.reason,
        branches=r.branches,
    )


def _saga_started(shard: str, lsn: int, payload: bytes) -> pb.FeedEvent:
    r = pb.WalSagaStart.FromString(payload)
    return pb.FeedEvent(
        shard=shard,
        lsn=lsn,
        kind=_SAGA_STARTED,  # type: ignore[arg-type]
        gid=r.gid,
        protocol=_SAGA,
        state=pb.TXN_STATE_RUNNING,
        unix_ms=r.unix_ms,
        idempotency_key=r.idempotency_key,
        created_unix_ms=r.created_unix_ms,
        deadline_unix_ms=r.deadline_unix_ms,
        trace_id=trace_id_of(r.traceparent),
        definition=r.definition,
        resolved_addresses=r.resolved_addresses,
    )


def _step(shard: str, lsn: int, payload: bytes) -> pb.FeedEvent:
    r = pb.WalSagaStep.FromString(payload)
    return pb.FeedEvent(
        shard=shard,
        lsn=lsn,
        kind=_STEP,  # type: ignore[arg-type]
        gid=r.gid,
        protocol=_SAGA,
        # Older logs do not say the saga's state: it follows from the step's then (a
        # compensation runs only while the saga compensates).
        state=r.saga_state or _STEP_SAGA_STATE.get(r.state, pb.TXN_STATE_RUNNING),
        unix_ms=r.unix_ms,
        step=r.step,
        step_status=pb.StepStatus(
            state=r.state,
            attempts=r.attempts,
            compensation_attempts=r.compensation_attempts,
            last_error=r.error,
            result=r.result,
        ),
    )


def _saga_state(shard: str, lsn: int, payload: bytes) -> pb.FeedEvent:
    r = pb.WalSagaState.FromString(payload)
    return pb.FeedEvent(
        shard=shard,
        lsn=lsn,
        kind=_SAGA_STATE,  # type: ignore[arg-type]
        gid=r.gid,
        protocol=_SAGA,
        state=r.state,
        unix_ms=r.unix_ms,
        reason=r.reason,
    )


_CONVERT: dict[int, Callable[[str, int, bytes], pb.FeedEvent]] = {
    RecordType.BEGIN: _begun,
    RecordType.PREPARE: _preparing,
    RecordType.COMMIT: _commit,
    RecordType.ABORT: _abort,
    RecordType.END: _ended,
    RecordType.SAGA_START: _saga_started,
    RecordType.SAGA_STEP: _step,
    RecordType.SAGA_STATE: _saga_state,
}


def record_event(shard: str, lsn: int, rtype: int, payload: bytes) -> pb.FeedEvent | None:
    """The feed event of one WAL record (None for the WAL's own records and for record
    types this version does not know)."""
    convert = _CONVERT.get(rtype)
    if convert is None:
        if rtype >= FIRST_USER_RTYPE:
            log.warning("event=feed_unknown_record rtype=%d lsn=%d", rtype, lsn)
        return None
    return convert(shard, lsn, payload)


def events_of(shard: str, records: Sequence[tuple[int, int, bytes]]) -> list[pb.FeedEvent]:
    convert = _CONVERT.get
    out = []
    for lsn, rtype, payload in records:
        fn = convert(rtype)
        if fn is not None:
            out.append(fn(shard, lsn, payload))
        elif rtype >= FIRST_USER_RTYPE:
            log.warning("event=feed_unknown_record rtype=%d lsn=%d", rtype, lsn)
    return out


class _NoWal:
    last_lsn = 0

    def submit(self, rtype: int, payload: bytes, *, sync: bool) -> tuple[int, asyncio.Future[None]]:
        raise Unavailable("a snapshot engine writes nothing")

    async def checkpoint(self, image: bytes, lsn: int) -> None:
        raise Unavailable("a snapshot engine writes nothing")


class _NoCalls:
    def resolve(self, service: str, address: str) -> str:
        return address

    def known(self, service: str) -> bool:
        return False

    def describe(self) -> str:
        return "none"

    async def send(self, *args: object, **kwargs: object) -> tuple[object, str]:
        raise Unavailable("a snapshot engine calls nobody")


def snapshot_events(shard: str, image: bytes) -> list[pb.FeedEvent]:
    """SNAPSHOT events for every transaction of a checkpoint image (built by the
    engine's own replay, so each is what GetTransaction shows after a restart from
    it), in gid order, then SNAPSHOT_END; all at the image's LSN."""
    from accord.coordinator._engine import Engine  # the engine imports the telemetry too

    lsn = pb.CheckpointImage.FromString(image).lsn
    engine = Engine(
        wal=_NoWal(),
        calls=_NoCalls(),  # type: ignore[arg-type]
        config=CoordinatorConfig(shard=shard, retain_finished=1 << 62),
    )
    engine.replay(image, ())
    out = []
    for txn in sorted(engine.table.all(), key=lambda t: t.gid):
        t = txn.to_pb()
        out.append(
            pb.FeedEvent(
                shard=shard,
                lsn=lsn,
                kind=K.FEED_EVENT_KIND_SNAPSHOT,
                gid=t.gid,
                protocol=t.protocol,
                state=t.state,
                idempotency_key=t.idempotency_key,
                created_unix_ms=t.created_unix_ms,
                deadline_unix_ms=t.deadline_unix_ms,
                trace_id=trace_id_of(txn.traceparent),
                one_phase=t.one_phase,
                reason=t.reason,
                transaction=t,
            )
        )
    out.append(pb.FeedEvent(shard=shard, lsn=lsn, kind=K.FEED_EVENT_KIND_SNAPSHOT_END))
    return out


def _read_events(
    reader: LogReader, shard: str, upto: int, limit: int
) -> tuple[int, list[pb.FeedEvent]]:
    """(last LSN read or 0, its events): up to ``limit`` records from disk."""
    records = reader.read(upto, limit)
    if not records:
        return 0, []
    return records[-1].lsn, events_of(shard, [(r.lsn, r.rtype, r.payload) for r in records])


def chunks(events: list[pb.FeedEvent], size: int) -> list[list[pb.FeedEvent]]:
    """``events`` cut into runs of at most ``size`` events and MAX_RESPONSE_BYTES."""
    out: list[list[pb.FeedEvent]] = []
    run: list[pb.FeedEvent] = []
    used = 0
    for e in events:
        n = e.ByteSize()
        if run and (len(run) >= size or used + n > MAX_RESPONSE_BYTES):
            out.append(run)
            run, used = [], 0
        run.append(e)
        used += n
    if run:
        out.append(run)
    return out


# --------------------------------------------------------------------- the hub


class _Batch:
    """One hand-over of durable records (one group commit), shared by every live
    subscriber; decoded at most once."""

    __slots__ = ("_events", "_responses", "first", "last", "records")

    def __init__(self, records: list[tuple[int, int, bytes]], last: int) -> None:
        self.records = records
        self.first = records[0][0]
        self.last = last
        self._events: list[pb.FeedEvent] | None = None
        self._responses: dict[int, list[pb.SubscribeResponse]] = {}

    def events(self, shard: str) -> list[pb.FeedEvent]:
        if self._events is None:
            self._events = events_of(shard, self.records)
        return self._events

    def responses(self, shard: str, size: int) -> list[pb.SubscribeResponse]:
        """The whole batch as responses of at most ``size`` events, made once for every
        subscriber with that size (durable_lsn: the batch's own)."""
        out = self._responses.get(size)
        if out is None:
            events = self.events(shard)
            out = self._responses[size] = [
                pb.SubscribeResponse(events=run, durable_lsn=self.last)
                for run in chunks(events, size)
            ]
        return out


class _Sub:
    __slots__ = ("live", "queue", "queued", "wake")

    def __init__(self) -> None:
        self.live = False
        self.queue: deque[_Batch] = deque()
        self.queued = 0  # records in queue
        self.wake = asyncio.Event()


class FeedHub:
    """Between the WAL writer (``wal.FeedSink``) and the Subscribe streams."""

    def __init__(
        self,
        shard: str,
        directory: Path,
        *,
        telemetry: CoordinatorTelemetry | None = None,
        max_batches: int = SUB_MAX_BATCHES,
        max_events: int = SUB_MAX_EVENTS,
        max_subscribers: int = 64,
    ) -> None:
        self.shard = shard
        #: Subscribe streams at once, over all callers (RESOURCE_EXHAUSTED beyond).
        self.max_subscribers = max_subscribers
        self.directory = Path(directory)
        self._tel = telemetry or CoordinatorTelemetry()
        self._max_batches = max_batches
        self._max_events = max_events
        self.durable_lsn = 0
        self.checkpoint_lsn = 0
        self._subs: set[_Sub] = set()
        self._live: list[_Sub] = []
        self._closed = False
        self._flush: Callable[[], None] | None = None

    # ------------------------------------------------------------------ FeedSink

    def opened(self, durable_lsn: int, checkpoint_lsn: int, flush: Callable[[], None]) -> None:
        self.durable_lsn = durable_lsn
        self.checkpoint_lsn = checkpoint_lsn
        self._flush = flush

    def durable(self, records: list[tuple[int, int, bytes]], durable_lsn: int) -> None:
        self.durable_lsn = durable_lsn
        if not self._live:
            return
        batch = _Batch(records, durable_lsn)
        n = len(records)
        full: list[_Sub] = []
        for sub in self._live:
            if len(sub.queue) >= self._max_batches or sub.queued + n > self._max_events:
                full.append(sub)
                continue
            sub.queue.append(batch)
            sub.queued += n
            sub.wake.set()
        for sub in full:
            self._to_catch_up(sub, "overflow")

    def checkpointed(self, lsn: int) -> None:
        self.checkpoint_lsn = lsn

    @property
    def waiting(self) -> bool:
        return bool(self._subs)

    # ------------------------------------------------------------------ subscribers

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def close(self) -> None:
        """Ends every stream (the server is stopping)."""
        self._closed = True
        for sub in self._subs:
            sub.wake.set()

    def _to_catch_up(self, sub: _Sub, why: str) -> None:
        if sub.live:
            sub.live = False
            self._live.remove(sub)
        sub.queue.clear()
        sub.queued = 0
        sub.wake.set()
        self._tel.feed_catch_up(why)

    def _to_live(self, sub: _Sub) -> None:
        sub.live = True
        self._live.append(sub)
        if self._flush is not None:
            self._flush()  # records written but not synced yet: make them durable soon

    def check(self, from_lsn: int, max_batch: int) -> int:
        """Validates a request; returns the batch size to use."""
        if max_batch > MAX_MAX_BATCH:
            raise InvalidArgument(f"max_batch {max_batch} is over {MAX_MAX_BATCH}")
        if len(self._subs) >= self.max_subscribers:
            raise ResourceExhausted(
                f"{len(self._subs)} Subscribe streams are open (limit {self.max_subscribers})"
            )
        if from_lsn > self.durable_lsn:
            raise OutOfRange(
                f"from_lsn {from_lsn} is past the shard's durable lsn {self.durable_lsn}"
            )
        return max_batch or DEFAULT_MAX_BATCH

    async def stream(
        self, from_lsn: int, max_batch: int
    ) -> AsyncGenerator[pb.SubscribeResponse, None]:
        """The feed after ``from_lsn``, in responses of at most ``max_batch`` events,
        until :meth:`close`. Raises InvalidArgument / OutOfRange before the first one."""
        size = self.check(from_lsn, max_batch)
        sub = _Sub()
        self._subs.add(sub)
        self._tel.feed_subscribed(1)
        reader: LogReader | None = None
        last = from_lsn  # every event up to here has been sent (or was not asked for)
        shard = self.shard

        def responses(events: list[pb.FeedEvent]) -> list[pb.SubscribeResponse]:
            self._tel.feed_sent(len(events))
            return [
                pb.SubscribeResponse(events=run, durable_lsn=self.durable_lsn)
                for run in chunks(events, size)
            ]

        try:
            # A handshake: the subscriber knows at once that it is connected and how far
            # the log is (its lag), before any event.
            yield pb.SubscribeResponse(durable_lsn=self.durable_lsn, shard=shard)
            if last < self.durable_lsn:
                self._tel.feed_catch_up("start")
            while not self._closed:
                if sub.live:
                    batch = await self._next(sub)
                    if batch is None or batch.last <= last:
                        continue
                    if batch.first > last + 1:  # cannot happen; never skip records
                        log.warning("event=feed_gap last=%d batch_first=%d", last, batch.first)
                        self._to_catch_up(sub, "gap")
                        continue
                    if batch.first <= last:
                        live = responses([e for e in batch.events(shard) if e.lsn > last])
                        last = batch.last
                    elif sub.queue and len(sub.queue[0].records) < size:
                        # More batches wait (the stream is slower than the group commit):
                        # one response for several saves gRPC's cost per message.
                        events = list(batch.events(shard))
                        last = batch.last
                        while sub.queue and len(events) + len(sub.queue[0].records) <= size:
                            more = sub.queue.popleft()
                            sub.queued -= len(more.records)
                            events.extend(more.events(shard))
                            last = more.last
                        live = responses(events)
                    else:  # the usual case: made once, shared by every subscriber
                        live = batch.responses(shard, size)
                        self._tel.feed_sent(len(batch.events(shard)))
                        last = batch.last
                    for resp in live:
                        yield resp
                    if not live:  # records that make no event (a checkpoint): the position
                        yield pb.SubscribeResponse(durable_lsn=batch.last)
                    continue
                target = self.durable_lsn
                if last >= target:
                    # The live edge: from the next hand-over on, this one is live.
                    if reader is not None:
                        reader.close()
                        reader = None
                    self._to_live(sub)
                    continue
                if reader is None:
                    reader = LogReader(self.directory, last)
                try:
                    # Read and decoded in a thread: a long catch-up must not hold the
                    # event loop (the GIL's switch interval lets the loop run meanwhile).
                    read, events = await asyncio.to_thread(
                        _read_events, reader, shard, target, size
                    )
                except RecordsGone:
                    reader.close()
                    reader = None
                    snap_lsn, events = await self._snapshot()
                    self._tel.feed_catch_up("snapshot")
                    last = max(last, snap_lsn)
                    for resp in responses(events):
                        yield resp
                    continue
                if read:
                    last = read
                    for resp in responses(events):
                        yield resp
        finally:
            if reader is not None:
                reader.close()
            self._subs.discard(sub)
            if sub.live:
                self._live.remove(sub)
            self._tel.feed_subscribed(-1)

    async def _next(self, sub: _Sub) -> _Batch | None:
        """The next live batch; None once the subscriber left the live path (or the hub
        closed)."""
        while not sub.queue:
            if not sub.live or self._closed:
                return None
            sub.wake.clear()
            await sub.wake.wait()
        batch = sub.queue.popleft()
        sub.queued -= len(batch.records)
        return batch

    async def _snapshot(self) -> tuple[int, list[pb.FeedEvent]]:
        """The live checkpoint's SNAPSHOT events (and its LSN)."""
        for _ in range(_SNAPSHOT_TRIES):
            lsn = self.checkpoint_lsn
            if lsn == 0:
                break
            try:
                image = await asyncio.to_thread(read_live_image, self.directory, lsn)
            except WalError as e:
                raise Unavailable(f"the feed cannot read checkpoint {lsn}: {e}") from e
            if image is not None:
                return lsn, await asyncio.to_thread(snapshot_events, self.shard, image)
        raise Unavailable(
            "the feed's records are gone from the log and no checkpoint image could be read"
        )
