"""The projection: a shard's feed events turned into the read model's rows.

Pure functions, no I/O: :func:`project` takes one :class:`~accord.v1.FeedEvent` and the
transaction's row as the store holds it (or None) and returns the new row and the
event's timeline entry, or None when the event changes nothing (a duplicate).

How each kind changes a transaction (mirroring the coordinator's own replay, so the read
model ends in the state the coordinator reports):

==================  ====================================================================
BEGUN               a 2PC transaction: key, created, deadline; state ACTIVE
PREPARING           the branch list (resolved addresses), one-phase flag; PREPARING
COMMIT              the decision: branches in phase two PREPARED, the others READ_ONLY
ABORT               the abort decision and its reason; ABORTING
ENDED               the final state; each branch's outcome (from the event when it lists
                    them, else PENDING/PREPARED branches take the outcome)
SAGA_STARTED        a saga: its steps (PENDING), resolved addresses; RUNNING
STEP                one step's state, attempts (never lowered), last error, result
SAGA_STATE          the saga's own state and reason
SNAPSHOT            the whole transaction as the coordinator retained it (an upsert)
SNAPSHOT_END        nothing here: the store advances the shard's LSN
==================  ====================================================================

The state after an event is the event's ``state`` when it carries one, else the kind's.
"Ended" means a final state, or STUCK (a saga waiting for an operator): it gets an end
time and a duration; a STUCK saga retried by an operator is unfinished again.

Duplicates: an event at or below the row's last LSN is skipped (a snapshot at the row's
LSN is applied again: snapshots are idempotent upserts). The store skips, per shard,
every event at or below the shard's applied LSN before it gets here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import accord.v1 as pb

K = pb.FeedEventKind

#: States after which a transaction has ended (STUCK: until an operator retries it).
ENDED_STATES = frozenset(
    {
        pb.TXN_STATE_COMMITTED,
        pb.TXN_STATE_ABORTED,
        pb.TXN_STATE_COMPLETED,
        pb.TXN_STATE_COMPENSATED,
        pb.TXN_STATE_STUCK,
    }
)
#: Ended well / ended badly (Stats' committed and aborted columns).
SUCCESS_STATES = frozenset({pb.TXN_STATE_COMMITTED, pb.TXN_STATE_COMPLETED})
FAILURE_STATES = frozenset({pb.TXN_STATE_ABORTED, pb.TXN_STATE_COMPENSATED, pb.TXN_STATE_STUCK})
#: Decided, phase two not finished: "in doubt" at participants.
PHASE_TWO_STATES = frozenset(
    {pb.TXN_STATE_COMMITTING, pb.TXN_STATE_ABORTING, pb.TXN_STATE_COMPENSATING}
)

_KIND_STATE: dict[int, int] = {
    K.FEED_EVENT_KIND_BEGUN: pb.TXN_STATE_ACTIVE,
    K.FEED_EVENT_KIND_PREPARING: pb.TXN_STATE_PREPARING,
    K.FEED_EVENT_KIND_COMMIT: pb.TXN_STATE_COMMITTING,
    K.FEED_EVENT_KIND_ABORT: pb.TXN_STATE_ABORTING,
    K.FEED_EVENT_KIND_SAGA_STARTED: pb.TXN_STATE_RUNNING,
}
_ACTION_STATES = frozenset(
    {pb.BRANCH_STATE_RUNNING, pb.BRANCH_STATE_SUCCEEDED, pb.BRANCH_STATE_FAILED}
)


@dataclass(frozen=True, kw_only=True)
class TxnRow:
    """One transaction as the read model keeps it (the ``transactions`` table)."""

    gid: str
    shard: str
    txn: pb.Transaction
    trace_id: str = ""
    ended_ms: int = 0
    last_lsn: int = 0

    @property
    def state(self) -> int:
        return int(self.txn.state)

    @property
    def created_ms(self) -> int:
        return int(self.txn.created_unix_ms)

    @property
    def duration_ms(self) -> int:
        return max(0, self.ended_ms - self.created_ms) if self.ended_ms else 0

    @property
    def services(self) -> tuple[str, ...]:
        """The participant services it touches (a direct address stands for itself),
        in first-seen order."""
        seen: dict[str, None] = {}
        for b in self.txn.branches:
            seen.setdefault(b.branch.service or b.branch.address, None)
        for st in self.txn.steps:
            seen.setdefault(st.step.service or st.step.address, None)
        seen.pop("", None)
        return tuple(seen)

    @property
    def branch_count(self) -> int:
        return len(self.txn.branches) + len(self.txn.steps)

    @property
    def attempts(self) -> int:
        return sum(b.attempts for b in self.txn.branches) + sum(
            st.attempts + st.compensation_attempts for st in self.txn.steps
        )

    def summary(self) -> pb.TransactionSummary:
        t = self.txn
        return pb.TransactionSummary(
            gid=self.gid,
            shard=self.shard,
            protocol=t.protocol,
            state=t.state,
            idempotency_key=t.idempotency_key,
            services=list(self.services),
            created_unix_ms=t.created_unix_ms,
            ended_unix_ms=self.ended_ms,
            duration_ms=self.duration_ms,
            reason=t.reason,
            trace_id=self.trace_id,
            last_lsn=self.last_lsn,
            branches=self.branch_count,
            attempts=self.attempts,
        )


@dataclass(frozen=True, kw_only=True)
class Projected:
    row: TxnRow
    entry: pb.TimelineEntry
    services: tuple[str, ...] = field(default_factory=tuple)


def shard_of_gid(gid: str, default: str) -> str:
    shard, sep, _ = gid.rpartition(":")
    return shard if sep and shard else default


def project(event: pb.FeedEvent, row: TxnRow | None, *, now_ms: int) -> Projected | None:
    """The row after ``event`` and its timeline entry; None when it changes nothing."""
    kind = event.kind
    if kind in (K.FEED_EVENT_KIND_SNAPSHOT_END, K.FEED_EVENT_KIND_UNSPECIFIED) or not event.gid:
        return None
    if row is not None and (
        event.lsn < row.last_lsn
        or (event.lsn == row.last_lsn and kind != K.FEED_EVENT_KIND_SNAPSHOT)
    ):
        return None  # a duplicate (or older than what the row already holds)
    when = event.unix_ms or now_ms
    txn = pb.Transaction()
    if kind == K.FEED_EVENT_KIND_SNAPSHOT:
        txn.CopyFrom(event.transaction)
        txn.gid = txn.gid or event.gid
    elif row is not None:
        txn.CopyFrom(row.txn)
    else:
        # First heard of here (its earlier records went before the feed reached us):
        # what the event says is all there is.
        txn.gid = event.gid
        txn.created_unix_ms = event.created_unix_ms or when
    if event.protocol:
        txn.protocol = event.protocol
    if not txn.protocol:
        txn.protocol = (
            pb.PROTOCOL_SAGA
            if kind in (K.FEED_EVENT_KIND_SAGA_STARTED, K.FEED_EVENT_KIND_STEP)
            else pb.PROTOCOL_TWO_PHASE_COMMIT
        )
    if event.idempotency_key:
        txn.idempotency_key = event.idempotency_key
    if event.created_unix_ms:
        txn.created_unix_ms = event.created_unix_ms
    if event.deadline_unix_ms:
        txn.deadline_unix_ms = event.deadline_unix_ms

    entry = pb.TimelineEntry(lsn=event.lsn, unix_ms=when, kind=kind)
    _APPLY[kind](event, txn, entry)

    state = event.state or _KIND_STATE.get(kind, 0) or txn.state
    txn.state = state  # type: ignore[assignment]
    txn.lsn = event.lsn
    entry.state = state  # type: ignore[assignment]
    if not entry.error and kind in (
        K.FEED_EVENT_KIND_ABORT,
        K.FEED_EVENT_KIND_ENDED,
        K.FEED_EVENT_KIND_SAGA_STATE,
    ):
        entry.error = event.reason

    prev_ended = row.ended_ms if row is not None else 0
    if state in ENDED_STATES:
        if kind == K.FEED_EVENT_KIND_SNAPSHOT and prev_ended:
            ended = prev_ended
        else:
            ended = prev_ended if (row is not None and row.state == state) else 0
            ended = ended or when
    else:
        ended = 0
    new = TxnRow(
        gid=event.gid,
        shard=event.shard or (row.shard if row else shard_of_gid(event.gid, "")),
        txn=txn,
        trace_id=event.trace_id or (row.trace_id if row else ""),
        ended_ms=ended,
        last_lsn=event.lsn,
    )
    return Projected(row=new, entry=entry, services=new.services)


# ---------------------------------------------------------------- per kind


def _begun(event: pb.FeedEvent, txn: pb.Transaction, entry: pb.TimelineEntry) -> None:
    txn.protocol = pb.PROTOCOL_TWO_PHASE_COMMIT


def _preparing(event: pb.FeedEvent, txn: pb.Transaction, entry: pb.TimelineEntry) -> None:
    resolved = event.resolved_addresses
    del txn.branches[:]
    for i, b in enumerate(event.branches):
        nb = txn.branches.add()
        nb.CopyFrom(b)
        if not nb.state:
            nb.state = pb.BRANCH_STATE_PENDING
        if not nb.resolved_address and i < len(resolved):
            nb.resolved_address = resolved[i]
    txn.one_phase = event.one_phase


def _commit(event: pb.FeedEvent, txn: pb.Transaction, entry: pb.TimelineEntry) -> None:
    phase_two = set(event.commit_branch_ids)
    for b in txn.branches:
        b.state = (
            pb.BRANCH_STATE_PREPARED
            if b.branch.branch_id in phase_two
            else pb.BRANCH_STATE_READ_ONLY
        )


def _abort(event: pb.FeedEvent, txn: pb.Transaction, entry: pb.TimelineEntry) -> None:
    txn.reason = txn.reason or event.reason


def _ended(event: pb.FeedEvent, txn: pb.Transaction, entry: pb.TimelineEntry) -> None:
    txn.reason = txn.reason or event.reason
    state = event.state or pb.TXN_STATE_ABORTED
    outcome = (
        pb.BRANCH_STATE_COMMITTED if state == pb.TXN_STATE_COMMITTED else pb.BRANCH_STATE_ABORTED
    )
    by_id = {b.branch.branch_id: b for b in event.branches}
    for b in txn.branches:
        told = by_id.get(b.branch.branch_id)
        if told is not None:
            if told.state:
                b.state = told.state
            b.attempts = max(b.attempts, told.attempts)
            if told.last_error:
                b.last_error = told.last_error
            if told.resolved_address:
                b.resolved_address = told.resolved_address
        elif b.state in (pb.BRANCH_STATE_PENDING, pb.BRANCH_STATE_PREPARED):
            b.state = outcome
    if not txn.branches and event.branches:
        txn.branches.extend(event.branches)


def _saga_started(event: pb.FeedEvent, txn: pb.Transaction, entry: pb.TimelineEntry) -> None:
    txn.protocol = pb.PROTOCOL_SAGA
    resolved = event.resolved_addresses
    del txn.steps[:]
    for i, step in enumerate(event.definition.steps):
        st = txn.steps.add()
        st.step.CopyFrom(step)
        st.state = pb.BRANCH_STATE_PENDING
        st.resolved_address = resolved[i] if i < len(resolved) else step.address


def _step(event: pb.FeedEvent, txn: pb.Transaction, entry: pb.TimelineEntry) -> None:
    txn.protocol = pb.PROTOCOL_SAGA
    i = event.step
    while len(txn.steps) <= i:  # a step of a saga whose start we never saw
        txn.steps.add().state = pb.BRANCH_STATE_PENDING
    st = txn.steps[i]
    told = event.step_status
    if told.HasField("step") and not st.step.name:
        st.step.CopyFrom(told.step)
    if told.state:
        st.state = told.state
    if told.state in _ACTION_STATES or told.attempts > st.attempts:
        st.attempts = max(st.attempts, told.attempts)
    st.compensation_attempts = max(st.compensation_attempts, told.compensation_attempts)
    if told.last_error:
        st.last_error = told.last_error
    if told.result:
        st.result = told.result
    if told.resolved_address:
        st.resolved_address = told.resolved_address
    entry.branch = st.step.name or f"step{i}"
    entry.branch_state = st.state
    entry.attempts = st.attempts
    entry.compensation_attempts = st.compensation_attempts
    entry.error = told.last_error
    entry.service = st.step.service or st.step.address


def _saga_state(event: pb.FeedEvent, txn: pb.Transaction, entry: pb.TimelineEntry) -> None:
    txn.protocol = pb.PROTOCOL_SAGA
    txn.reason = event.reason or txn.reason


def _snapshot(event: pb.FeedEvent, txn: pb.Transaction, entry: pb.TimelineEntry) -> None:
    return None  # the whole transaction was copied above


def _nothing(event: pb.FeedEvent, txn: pb.Transaction, entry: pb.TimelineEntry) -> None:
    return None


_APPLY = {
    K.FEED_EVENT_KIND_BEGUN: _begun,
    K.FEED_EVENT_KIND_PREPARING: _preparing,
    K.FEED_EVENT_KIND_COMMIT: _commit,
    K.FEED_EVENT_KIND_ABORT: _abort,
    K.FEED_EVENT_KIND_ENDED: _ended,
    K.FEED_EVENT_KIND_SAGA_STARTED: _saga_started,
    K.FEED_EVENT_KIND_STEP: _step,
    K.FEED_EVENT_KIND_SAGA_STATE: _saga_state,
    K.FEED_EVENT_KIND_SNAPSHOT: _snapshot,
    K.FEED_EVENT_KIND_SNAPSHOT_END: _nothing,
}


def with_shard(row: TxnRow, shard: str) -> TxnRow:
    return row if row.shard else replace(row, shard=shard)
