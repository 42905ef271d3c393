"""The barrier (DESIGN guarantee 5) and fencing (guarantee 7).

Every call runs on the writer thread, inside its own savepoint of a group commit, so the
barrier row, the branch row, the fence and the business change of one call are written
in ONE local transaction: they are all durable or none is.

Tables (created by :func:`create_schema`, next to the business tables):

``accord_barrier(gid, branch_id, op, status, message, read_only, result, created_at,
UNIQUE(gid, branch_id, op))``
    The final answer of each (branch, op). A duplicate call returns the recorded answer
    without running the handler. "Not yet" answers and internal errors are not recorded
    (nothing happened; the retry runs the handler again).

``accord_branches(gid, branch_id, operation, payload, state, coordinator_address, shard,
epoch, prepared_at, updated_at)``
    One row per branch this participant voted on, so a prepared branch survives a crash
    and the in-doubt resolver knows what to ask about. ``state`` is PREPARED (yes vote,
    resources held), READ_ONLY (read-only vote: leaves phase two), COMMITTED or ABORTED
    (a refused vote, a branch aborted before its prepare, or an aborted branch).

``accord_audit(seq INTEGER PRIMARY KEY, gid, branch_id, op, outcome, source, shard,
epoch, coordinator_address, detail, at)``
    Append-only history of every answered call, written in the same local transaction as
    the barrier row and the business change (so exactly as durable as the change; a call
    undone is never audited). One row per call: ``op`` is the :class:`Op` value, or
    ``one_phase_commit``; ``outcome`` is what the call did (:class:`Outcome`: PREPARED,
    READ_ONLY, REFUSED, COMMITTED, ABORTED, ABORTED_BEFORE_PREPARE, NOOP, EXECUTED,
    COMPENSATED, NULL_COMPENSATION, or DUPLICATE when answered from the barrier,
    CONFLICT for an illegal change refused, FENCED for a stale epoch); ``source`` is
    ``coordinator`` (a coordinator's call) or ``resolver`` (the in-doubt resolver
    applying the outcome it asked for); ``shard``, ``epoch`` and ``coordinator_address``
    are the call's; ``detail`` is the answer's message (for a DUPLICATE, the recorded
    status and message); ``at`` is the participant's wall clock (``time.time()``).
    "Not yet" answers and internal errors leave no row (nothing happened). The row costs
    one INSERT per call: measured on the barrier alone (no fsync), 5-8 µs of CPU on a
    call of 31-46 µs, a few percent of a participant's CPU per gRPC call; duplicates are
    rare retries, so recording them costs the hot path nothing. Like ``accord_barrier`` it is never pruned by the SDK: it is the evidence
    the offline checker (``accord.tools.chaos``) reads, with :func:`accord.participants.read_audit`.

``accord_fence(shard, epoch, updated_at)``
    The highest coordinator epoch seen per WAL shard. A call with a lower epoch is
    refused ("fenced"); a higher one is recorded. Epoch 0 or an empty shard means no
    fencing (static single-node mode). Epochs are also kept in the store's writer-thread
    memo, so the row is read once per shard and written only when the epoch rises.

The hot path costs few statements: a Prepare claims its branch row first (an INSERT that
does nothing when the row exists: then it is a duplicate, answered from the barrier), and
a Commit or Abort of a PREPARED branch changes the state with one ``UPDATE`` that matches
the call's operation and payload (a call carrying something else than what was prepared
falls back to an ``UPDATE ... RETURNING`` that yields the prepared operation and payload:
the prepared branch is the truth). Either is undone with the handler's
changes when the handler refuses or says "not yet". New databases store both tables
``WITHOUT ROWID`` and index only PREPARED branches; older files keep their layout.

The rules, per op (after fencing and the duplicate check):

- Prepare: run the prepare handler. Yes → PREPARED; read-only → READ_ONLY; ``Refuse``
  → the handler's changes are undone, the no is recorded and the branch is ABORTED;
  ``NotYet`` → undone, nothing recorded (only a raised epoch is kept).
- Abort before any Prepare (the coordinator gave up on a Prepare still in flight): a
  recorded no-op that also records the Prepare as refused ("already aborted"), so the
  late Prepare is refused without running its handler — no resources are held by a
  branch nobody will ever finish (no hanging). A Compensate before its Execute follows
  the same rule (the ``_CANCELS`` table).
- Commit: only of a PREPARED (or READ_ONLY: no-op) branch; otherwise FAILED_PRECONDITION.
  With ``one_phase``: prepare and commit handlers in one savepoint; a refusal is the
  outcome (ABORTED).
- Abort of a PREPARED branch runs the abort handler; of a refused, read-only or already
  aborted branch it is a no-op; of a committed one it is refused ("already committed").

Saga calls (a step is the branch: ``branch_id`` is the step's name) use barrier rows
only, no branch row (nothing is held between calls, so nothing is ever in doubt):

- Execute: a recorded execute answer is returned as it is (OK with the same result
  bytes, or the refusal) without running the handler. Otherwise the execute handler
  runs. Returned bytes → OK, recorded with the bytes; ``Refuse`` → the handler's
  changes are undone and the refusal recorded; ``NotYet`` → undone, nothing recorded.
- Compensate: a recorded compensate answer is returned as it is. Otherwise, by the
  recorded execute answer: none (the Compensate overtook its Execute, or the Execute
  never got through) → a recorded no-op ("null compensation") that also records the
  Execute as refused ("already compensated"), so the late Execute never runs (no
  hanging); a refusal → a recorded no-op (the step changed nothing); OK → the
  compensate handler runs once, and its answer is recorded. ``NotYet`` → undone,
  nothing recorded; a ``Refuse`` is a bug of the handler (a compensation must not
  refuse): undone, logged, answered "not yet" (FAILED_PRECONDITION), so the coordinator
  retries and, past its policy, reports the saga STUCK.
"""

from __future__ import annotations

import enum
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from accord.participants._app import Participant
from accord.participants._store import undo_job
from accord.participants._types import BranchCall, NotYet, Op, Refuse, Result, Status, Vote

log = logging.getLogger("accord.participant")

SCHEMA = """
CREATE TABLE IF NOT EXISTS accord_barrier (
    gid        TEXT NOT NULL,
    branch_id  TEXT NOT NULL,
    op         TEXT NOT NULL,
    status     TEXT NOT NULL,
    message    TEXT NOT NULL DEFAULT '',
    read_only  INTEGER NOT NULL DEFAULT 0,
    result     BLOB NOT NULL DEFAULT x'',
    created_at REAL NOT NULL,
    PRIMARY KEY (gid, branch_id, op)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS accord_branches (
    gid                 TEXT NOT NULL,
    branch_id           TEXT NOT NULL,
    operation           TEXT NOT NULL,
    payload             BLOB NOT NULL,
    state               TEXT NOT NULL
        CHECK (state IN ('PREPARED', 'READ_ONLY', 'COMMITTED', 'ABORTED')),
    coordinator_address TEXT NOT NULL DEFAULT '',
    shard               TEXT NOT NULL DEFAULT '',
    epoch               INTEGER NOT NULL DEFAULT 0,
    prepared_at         REAL NOT NULL,
    updated_at          REAL NOT NULL,
    PRIMARY KEY (gid, branch_id)
) WITHOUT ROWID;
DROP INDEX IF EXISTS accord_branches_state;
CREATE INDEX IF NOT EXISTS accord_branches_prepared ON accord_branches (prepared_at)
    WHERE state = 'PREPARED';
CREATE TABLE IF NOT EXISTS accord_audit (
    seq                 INTEGER PRIMARY KEY,
    gid                 TEXT NOT NULL,
    branch_id           TEXT NOT NULL,
    op                  TEXT NOT NULL,
    outcome             TEXT NOT NULL,
    source              TEXT NOT NULL,
    shard               TEXT NOT NULL DEFAULT '',
    epoch               INTEGER NOT NULL DEFAULT 0,
    coordinator_address TEXT NOT NULL DEFAULT '',
    detail              TEXT NOT NULL DEFAULT '',
    at                  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS accord_fence (
    shard      TEXT PRIMARY KEY,
    epoch      INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
"""

#: A cancelling op and the action it cancels: a cancel that arrives first records the
#: action as refused, so the late action is refused too.
_CANCELS = {Op.ABORT: Op.PREPARE, Op.COMPENSATE: Op.EXECUTE}


class BranchState(enum.StrEnum):
    PREPARED = "PREPARED"
    READ_ONLY = "READ_ONLY"
    COMMITTED = "COMMITTED"
    ABORTED = "ABORTED"


class Outcome(enum.StrEnum):
    """What one call did, as recorded in ``accord_audit.outcome``."""

    PREPARED = "PREPARED"
    READ_ONLY = "READ_ONLY"
    #: A no vote (Prepare, one-phase Commit) or a refused saga action.
    REFUSED = "REFUSED"
    #: The commit handler ran (two-phase Commit, or a one-phase Commit that said yes).
    COMMITTED = "COMMITTED"
    #: The abort handler ran: a PREPARED branch released.
    ABORTED = "ABORTED"
    #: An Abort before its Prepare: recorded, and the late Prepare refused in advance.
    ABORTED_BEFORE_PREPARE = "ABORTED_BEFORE_PREPARE"
    #: Answered OK without any change (Commit of a read-only branch, Abort of a branch
    #: holding nothing, Compensate of a refused action).
    NOOP = "NOOP"
    EXECUTED = "EXECUTED"
    COMPENSATED = "COMPENSATED"
    #: A Compensate before its Execute: recorded, and the late Execute refused in advance.
    NULL_COMPENSATION = "NULL_COMPENSATION"
    #: Answered from the barrier (a retry); ``detail`` is the recorded answer.
    DUPLICATE = "DUPLICATE"
    #: An illegal state change refused (Commit of an aborted branch, Abort of a
    #: committed one, Commit without a Prepare). Nothing changed.
    CONFLICT = "CONFLICT"
    #: Refused: the call's epoch is lower than one already seen for its shard.
    FENCED = "FENCED"


#: ``accord_audit.source``: a coordinator's call, or the in-doubt resolver applying the
#: outcome it asked for.
SOURCE_COORDINATOR = "coordinator"
SOURCE_RESOLVER = "resolver"
#: ``accord_audit.op`` of a one-phase Commit (the other ops are :class:`Op` values).
OP_ONE_PHASE_COMMIT = "one_phase_commit"


@dataclass(frozen=True, kw_only=True)
class BranchRecord:
    """A row of ``accord_branches``."""

    gid: str
    branch_id: str
    operation: str
    payload: bytes
    state: BranchState
    coordinator_address: str
    shard: str
    epoch: int
    prepared_at: float


#: What phase two needs of a branch row: its state, operation and payload.
_Loaded = tuple[BranchState, str, bytes]
#: A call's answer and what the audit records of it (None: nothing, e.g. "not yet").
_Answer = tuple[Result, Outcome | None]


def create_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)


# The SQL of the hot path, as constants (the connection caches their prepared statements).
_SQL_RECORDED = (
    "SELECT status, message, read_only, result FROM accord_barrier"
    " WHERE gid = ? AND branch_id = ? AND op = ?"
)
#: The recorded answer of an op and the branch row, in one statement (always one row).
_SQL_LOOKUP = (
    "SELECT r.status, r.message, r.read_only, r.result, b.state, b.operation, b.payload"
    " FROM (SELECT ?1 AS gid, ?2 AS branch_id) AS k"
    " LEFT JOIN accord_barrier AS r"
    " ON r.gid = k.gid AND r.branch_id = k.branch_id AND r.op = ?3"
    " LEFT JOIN accord_branches AS b ON b.gid = k.gid AND b.branch_id = k.branch_id"
)
_SQL_RECORD = (
    "INSERT INTO accord_barrier (gid, branch_id, op, status, message, read_only, result,"
    " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQL_INSERT_BRANCH = (
    "INSERT INTO accord_branches (gid, branch_id, operation, payload, state,"
    " coordinator_address, shard, epoch, prepared_at, updated_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQL_CLAIM_BRANCH = _SQL_INSERT_BRANCH + " ON CONFLICT (gid, branch_id) DO NOTHING"
#: Phase two of a PREPARED branch whose call carries what was prepared (the usual case):
#: the new state, with no RETURNING (which costs SQLite an ephemeral table and a second
#: step). Measured alone, 11.5 against 16.6 µs of CPU.
_SQL_FINISH_SAME = (
    "UPDATE accord_branches SET state = ?, updated_at = ?"
    " WHERE gid = ? AND branch_id = ? AND state = 'PREPARED' AND operation = ? AND payload = ?"
)
#: Phase two of a PREPARED branch: the new state, returning what was prepared.
_SQL_FINISH = (
    "UPDATE accord_branches SET state = ?, updated_at = ?"
    " WHERE gid = ? AND branch_id = ? AND state = 'PREPARED' RETURNING operation, payload"
)
_SQL_SET_STATE = (
    "UPDATE accord_branches SET state = ?, updated_at = ?"
    " WHERE gid = ? AND branch_id = ? AND state = ?"
)
#: Both saga answers of a step (zero, one or two rows).
_SQL_SAGA_RECORDED = (
    "SELECT op, status, message, read_only, result FROM accord_barrier"
    " WHERE gid = ? AND branch_id = ? AND op IN ('execute', 'compensate')"
)
_SQL_AUDIT = (
    "INSERT INTO accord_audit (gid, branch_id, op, outcome, source, shard, epoch,"
    " coordinator_address, detail, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQL_FENCE = "SELECT epoch FROM accord_fence WHERE shard = ?"
_SQL_RAISE_FENCE = (
    "INSERT INTO accord_fence (shard, epoch, updated_at) VALUES (?, ?, ?)"
    " ON CONFLICT (shard) DO UPDATE SET epoch = excluded.epoch,"
    " updated_at = excluded.updated_at"
)

#: Enum members by their stored value (cheaper than calling the enum).
_STATUS = {status.value: status for status in Status}
_STATE = {state.value: state for state in BranchState}
_COMMITTED_STATE = BranchState.COMMITTED.value
_ABORTED_STATE = BranchState.ABORTED.value

#: Answers that carry no per-call text (Result is immutable, so they are shared).
_PREPARED = Result(Status.OK, "prepared")
_READ_ONLY = Result(Status.OK, "read-only", read_only=True)
_COMMITTED = Result(Status.OK, "committed")
_ABORTED = Result(Status.OK, "aborted")
_EXECUTED = Result(Status.OK, "executed")
_COMPENSATED = Result(Status.OK, "compensated")
_NULL_COMPENSATION = Result(Status.OK, "no-op: compensated before the action ran")
_NOTHING_TO_COMPENSATE = Result(Status.OK, "no-op: the action was refused, nothing to undo")
_LATE_EXECUTE = Result(
    Status.REFUSED, "already compensated: the compensation arrived before the action"
)
_COMPENSATE_OP = Op.COMPENSATE.value
_COORDINATOR = SOURCE_COORDINATOR
_RESOLVER = SOURCE_RESOLVER
_ONE_PHASE_COMMIT = OP_ONE_PHASE_COMMIT
_OK_STATUS = Status.OK.value

#: Key of a shard's fence epoch in :attr:`Store.cache <participants.Store.cache>`.
_FENCE_KEY = "accord.fence"
_UNKNOWN = object()


class Barrier:
    """Runs one call under the barrier rules. Synchronous: runs on the writer thread,
    inside the savepoint the store opened for the call. A handler's changes are undone
    with :func:`undo_job`, which is why the fence and barrier rows are written after the
    handler ran.

    ``cache`` is the store's writer-thread memo (:attr:`Store.cache
    <participants.Store.cache>`): the fence epoch of each shard is kept there, so a call
    reads ``accord_fence`` only the first time its shard is seen; the row is written only
    when the epoch rises, and it stays the truth (the store clears the memo whenever the
    database may hold something else: a batch rolled back, another writer). The fence
    row is the last thing a call writes, so undoing a call never has to undo it.
    """

    def __init__(
        self,
        participant: Participant,
        *,
        clock: Callable[[], float] = time.time,
        cache: dict[Any, Any] | None = None,
    ) -> None:
        self._p = participant
        self._clock = clock
        self._cache: dict[Any, Any] = {} if cache is None else cache

    def run(self, conn: sqlite3.Connection, op: Op, call: BranchCall, *, fence: bool) -> Result:
        """``fence=False`` only for the in-doubt resolver, which applies an outcome it
        got from the coordinator itself rather than a coordinator's command."""
        new_epoch: int | None = None
        shard = call.shard
        if fence and shard:
            key = (_FENCE_KEY, shard)
            cache = self._cache
            seen = cache.get(key, _UNKNOWN)
            if seen is _UNKNOWN:
                seen = cache[key] = _fence_epoch(conn, shard)
            epoch = call.epoch
            if seen is not None and 0 < epoch < seen:
                fenced = Result(
                    Status.FENCED, f"fenced: epoch {epoch} < {seen} for shard {shard!r}"
                )
                self._audit(conn, op, call, fenced, Outcome.FENCED, fence)
                return fenced
            if seen is None or epoch > seen:
                new_epoch = epoch
        outcome: Outcome | None
        if op is Op.PREPARE:
            # Claim the branch row first: inserted, this is the first prepare; already
            # there, a duplicate (every branch row comes with its prepare barrier row).
            if self._insert_branch(conn, call, BranchState.PREPARED, claim=True):
                result, outcome = self._prepare(conn, call)
            else:
                recorded = _recorded(conn, call, op)
                if recorded is None:
                    raise RuntimeError(f"branch {call.gid}/{call.branch_id}: no recorded prepare")
                result, outcome = recorded, Outcome.DUPLICATE
        elif op is Op.COMMIT or op is Op.ABORT:
            # Phase two of a PREPARED branch (the usual case) in one statement: the state
            # changes, if the call carries the prepared operation and payload (else they
            # come back from a second UPDATE ... RETURNING, as the prepared branch is the
            # truth). A PREPARED branch has no recorded commit or abort: that answer is
            # recorded with the change.
            state = _COMMITTED_STATE if op is Op.COMMIT else _ABORTED_STATE
            now = self._clock()
            if (
                conn.execute(
                    _SQL_FINISH_SAME,
                    (state, now, call.gid, call.branch_id, call.operation, call.payload),
                ).rowcount
                == 1
            ):
                result, outcome = self._finish(conn, call, op)
            else:
                finished = conn.execute(
                    _SQL_FINISH, (state, now, call.gid, call.branch_id)
                ).fetchone()
                if finished is not None:
                    stored = (BranchState.PREPARED, str(finished[0]), bytes(finished[1]))
                    result, outcome = self._finish(conn, _stored(call, stored), op)
                else:
                    result, outcome = self._phase_two(conn, op, call)
        elif op is Op.EXECUTE:
            recorded = _recorded(conn, call, op)
            if recorded is None:
                result, outcome = self._execute(conn, call)
            else:
                result, outcome = recorded, Outcome.DUPLICATE
        else:
            result, outcome = self._compensate(conn, call)
        # Both after any undo_job() of the handler, so neither is ever undone.
        if outcome is not None:
            self._audit(conn, op, call, result, outcome, fence)
        if new_epoch is not None:
            conn.execute(_SQL_RAISE_FENCE, (shard, new_epoch, self._clock()))
            self._cache[(_FENCE_KEY, shard)] = new_epoch
        return result

    def _audit(
        self,
        conn: sqlite3.Connection,
        op: Op,
        call: BranchCall,
        result: Result,
        outcome: Outcome,
        fence: bool,
    ) -> None:
        """One ``accord_audit`` row for a call that changed something or was answered
        (not for "not yet" or an internal error: nothing happened)."""
        if outcome is Outcome.DUPLICATE:
            detail = f"{result.status.value}: {result.message}"
        else:
            detail = result.message
        conn.execute(
            _SQL_AUDIT,
            (
                call.gid,
                call.branch_id,
                _ONE_PHASE_COMMIT if op is Op.COMMIT and call.one_phase else op.value,
                outcome.value,
                _COORDINATOR if fence else _RESOLVER,
                call.shard,
                call.epoch,
                call.coordinator_address,
                detail,
                self._clock(),
            ),
        )

    # -- the ops ------------------------------------------------------------------------

    def _phase_two(self, conn: sqlite3.Connection, op: Op, call: BranchCall) -> _Answer:
        """Commit or abort of a branch that is not PREPARED (or has no row)."""
        row = conn.execute(_SQL_LOOKUP, (call.gid, call.branch_id, op.value)).fetchone()
        if row[0] is not None:
            return _result(row), Outcome.DUPLICATE
        if op is Op.ABORT:
            return self._abort(conn, call, _loaded(row))
        if call.one_phase:
            return self._one_phase(conn, call, _loaded(row))
        return self._commit(conn, call, _loaded(row))

    def _prepare(self, conn: sqlite3.Connection, call: BranchCall) -> _Answer:
        # The branch row is already inserted (PREPARED) in this savepoint.
        try:
            vote = _vote(self._p.prepare(conn, call))
        except Refuse as no:
            undo_job(conn)  # the handler's changes and the claimed branch row
            result = Result(Status.REFUSED, no.reason)
            self._record(conn, call, result, Op.PREPARE)
            self._insert_branch(conn, call, BranchState.ABORTED)
            return result, Outcome.REFUSED
        except NotYet as later:
            undo_job(conn)
            return Result(Status.NOT_YET, later.reason), None
        if vote is Vote.READ_ONLY:
            self._record(conn, call, _READ_ONLY, Op.PREPARE)
            self._set_state(conn, call, BranchState.PREPARED, BranchState.READ_ONLY)
            return _READ_ONLY, Outcome.READ_ONLY
        self._record(conn, call, _PREPARED, Op.PREPARE)
        return _PREPARED, Outcome.PREPARED

    def _finish(self, conn: sqlite3.Connection, call: BranchCall, op: Op) -> _Answer:
        """Commit or abort of a PREPARED branch whose state the caller just changed
        (undone with the handler's changes if the handler says "not yet"); ``call``
        carries the prepared operation and payload."""
        try:
            if op is Op.COMMIT:
                self._p.commit(conn, call)
            else:
                self._p.abort(conn, call)
        except NotYet as later:
            undo_job(conn)
            return Result(Status.NOT_YET, later.reason), None
        except Refuse as no:
            if op is Op.COMMIT:
                raise RuntimeError(f"commit handler refused after a yes vote: {no}") from no
            raise RuntimeError(f"abort handler refused: {no}") from no
        if op is Op.COMMIT:
            self._record(conn, call, _COMMITTED, op)
            return _COMMITTED, Outcome.COMMITTED
        self._record(conn, call, _ABORTED, op)
        return _ABORTED, Outcome.ABORTED

    def _commit(
        self, conn: sqlite3.Connection, call: BranchCall, branch: _Loaded | None
    ) -> _Answer:
        if branch is None:
            return Result(
                Status.CONFLICT, "commit without a prepare: no yes vote recorded"
            ), Outcome.CONFLICT
        return self._commit_branch(conn, call, branch)

    def _commit_branch(
        self, conn: sqlite3.Connection, call: BranchCall, branch: _Loaded
    ) -> _Answer:
        state = branch[0]
        if state is BranchState.ABORTED:
            if call.one_phase:  # the answer of a one-phase commit is the outcome
                result = Result(Status.REFUSED, "already aborted")
                self._record(conn, call, result, Op.COMMIT)
                return result, Outcome.REFUSED
            return Result(Status.CONFLICT, "commit refused: branch already aborted"), (
                Outcome.CONFLICT
            )
        if state is BranchState.PREPARED:
            try:
                self._p.commit(conn, _stored(call, branch))
            except NotYet as later:
                undo_job(conn)
                return Result(Status.NOT_YET, later.reason), None
            except Refuse as no:
                raise RuntimeError(f"commit handler refused after a yes vote: {no}") from no
            self._set_state(conn, call, BranchState.PREPARED, BranchState.COMMITTED)
            result, outcome = _COMMITTED, Outcome.COMMITTED
        else:  # READ_ONLY (COMMITTED is answered by the barrier row)
            result = Result(Status.OK, f"nothing to commit: branch is {state}")
            outcome = Outcome.NOOP
        self._record(conn, call, result, Op.COMMIT)
        return result, outcome

    def _one_phase(
        self, conn: sqlite3.Connection, call: BranchCall, branch: _Loaded | None
    ) -> _Answer:
        # Every recorded prepare (and abort-before-prepare) has a branch row.
        if branch is not None:
            return self._commit_branch(conn, call, branch)
        try:
            vote = _vote(self._p.prepare(conn, call))
            if vote is not Vote.READ_ONLY:
                self._p.commit(conn, call)
        except Refuse as no:
            undo_job(conn)
            result = Result(Status.REFUSED, no.reason)
            self._record(conn, call, result, Op.PREPARE, Op.COMMIT)
            self._insert_branch(conn, call, BranchState.ABORTED)
            return result, Outcome.REFUSED
        except NotYet as later:
            undo_job(conn)
            return Result(Status.NOT_YET, later.reason), None
        read_only = vote is Vote.READ_ONLY
        result = Result(Status.OK, "committed (one phase)", read_only=read_only)
        self._record(conn, call, result, Op.PREPARE, Op.COMMIT)
        self._insert_branch(conn, call, BranchState.COMMITTED)
        return result, Outcome.READ_ONLY if read_only else Outcome.COMMITTED

    def _abort(self, conn: sqlite3.Connection, call: BranchCall, branch: _Loaded | None) -> _Answer:
        # Every recorded prepare (and abort-before-prepare) has a branch row.
        if branch is None:
            # Abort before Prepare: refuse the late Prepare in advance (no hanging).
            late = Result(Status.REFUSED, "already aborted: the abort arrived before the prepare")
            self._record(conn, call, late, _CANCELS[Op.ABORT])
            self._insert_branch(conn, call, BranchState.ABORTED)
            result = Result(Status.OK, "no-op: aborted before prepare")
            outcome = Outcome.ABORTED_BEFORE_PREPARE
        elif branch[0] is BranchState.COMMITTED:
            return Result(Status.CONFLICT, "abort refused: branch already committed"), (
                Outcome.CONFLICT
            )
        elif branch[0] is BranchState.PREPARED:
            try:
                self._p.abort(conn, _stored(call, branch))
            except NotYet as later:
                undo_job(conn)
                return Result(Status.NOT_YET, later.reason), None
            except Refuse as no:
                raise RuntimeError(f"abort handler refused: {no}") from no
            self._set_state(conn, call, BranchState.PREPARED, BranchState.ABORTED)
            result, outcome = _ABORTED, Outcome.ABORTED
        else:
            result = Result(Status.OK, f"no-op: branch holds nothing ({branch[0]})")
            outcome = Outcome.NOOP
        self._record(conn, call, result, Op.ABORT)
        return result, outcome

    def _execute(self, conn: sqlite3.Connection, call: BranchCall) -> _Answer:
        """A saga action with no recorded answer (not executed, not compensated)."""
        try:
            out = self._p.execute(conn, call)
        except Refuse as no:
            undo_job(conn)
            result = Result(Status.REFUSED, no.reason)
            outcome = Outcome.REFUSED
        except NotYet as later:
            undo_job(conn)
            return Result(Status.NOT_YET, later.reason), None
        else:
            result = _EXECUTED if out is None else Result(Status.OK, "executed", result=_out(out))
            outcome = Outcome.EXECUTED
        self._record(conn, call, result, Op.EXECUTE)
        return result, outcome

    def _compensate(self, conn: sqlite3.Connection, call: BranchCall) -> _Answer:
        executed: str | None = None
        for row in conn.execute(_SQL_SAGA_RECORDED, (call.gid, call.branch_id)).fetchall():
            if row[0] == _COMPENSATE_OP:
                return _result(row[1:]), Outcome.DUPLICATE
            executed = row[1]
        if executed is None:
            # Compensate before Execute: nothing to undo; refuse the late Execute now.
            self._record(conn, call, _LATE_EXECUTE, _CANCELS[Op.COMPENSATE])
            result, outcome = _NULL_COMPENSATION, Outcome.NULL_COMPENSATION
        elif executed != _OK_STATUS:
            result, outcome = _NOTHING_TO_COMPENSATE, Outcome.NOOP
        else:
            try:
                self._p.compensate(conn, call)
            except NotYet as later:
                undo_job(conn)
                return Result(Status.NOT_YET, later.reason), None
            except Refuse as no:
                undo_job(conn)
                log.error(
                    "event=compensate_refused gid=%s branch=%s operation=%s reason=%r"
                    " (a compensation must not refuse; answered not-yet, will be retried)",
                    call.gid,
                    call.branch_id,
                    call.operation,
                    no.reason,
                )
                return Result(Status.NOT_YET, f"compensation refused (retried): {no.reason}"), None
            result, outcome = _COMPENSATED, Outcome.COMPENSATED
        self._record(conn, call, result, Op.COMPENSATE)
        return result, outcome

    # -- rows ---------------------------------------------------------------------------

    def _record(self, conn: sqlite3.Connection, call: BranchCall, result: Result, *ops: Op) -> None:
        # A plain INSERT: the row was checked absent in this same transaction, so a
        # conflict would be a bug and must fail loudly.
        now = self._clock()
        for op in ops:
            conn.execute(
                _SQL_RECORD,
                (
                    call.gid,
                    call.branch_id,
                    op.value,
                    result.status.value,
                    result.message,
                    int(result.read_only),
                    result.result,
                    now,
                ),
            )

    def _insert_branch(
        self, conn: sqlite3.Connection, call: BranchCall, state: BranchState, *, claim: bool = False
    ) -> bool:
        """Inserts the branch row. A plain INSERT (a conflict is a bug and fails the call
        loudly), or with ``claim`` one that does nothing when the row exists; returns
        whether a row was inserted."""
        now = self._clock()
        cur = conn.execute(
            _SQL_CLAIM_BRANCH if claim else _SQL_INSERT_BRANCH,
            (
                call.gid,
                call.branch_id,
                call.operation,
                call.payload,
                state.value,
                call.coordinator_address,
                call.shard,
                call.epoch,
                now,
                now,
            ),
        )
        return cur.rowcount == 1

    def _set_state(
        self, conn: sqlite3.Connection, call: BranchCall, old: BranchState, new: BranchState
    ) -> None:
        cur = conn.execute(
            _SQL_SET_STATE, (new.value, self._clock(), call.gid, call.branch_id, old.value)
        )
        if cur.rowcount != 1:
            raise RuntimeError(f"branch {call.gid}/{call.branch_id}: expected state {old}")


# -- queries used by the service and the resolver ------------------------------------------


def in_doubt(conn: sqlite3.Connection, prepared_before: float) -> list[BranchRecord]:
    """Branches held PREPARED since before ``prepared_before`` (oldest first)."""
    rows = conn.execute(
        "SELECT gid, branch_id, operation, payload, state, coordinator_address, shard, epoch,"
        " prepared_at FROM accord_branches WHERE state = 'PREPARED' AND prepared_at <= ?"
        " ORDER BY prepared_at",
        (prepared_before,),
    ).fetchall()
    return [_branch(row) for row in rows]


def branch_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Number of branch rows per state (every state present, zero when none)."""
    counts = {state.value: 0 for state in BranchState}
    for state, n in conn.execute("SELECT state, COUNT(*) FROM accord_branches GROUP BY state"):
        counts[str(state)] = int(n)
    return counts


# -- helpers --------------------------------------------------------------------------------


def _vote(vote: object) -> Vote:
    if vote is None:
        return Vote.YES
    if isinstance(vote, Vote):
        return vote
    raise TypeError(f"prepare handler returned {vote!r}; expected a Vote or None")


def _out(out: object) -> bytes:
    if isinstance(out, bytes):
        return out
    if isinstance(out, (bytearray, memoryview)):
        return bytes(out)
    raise TypeError(f"execute handler returned {out!r}; expected bytes or None")


def _stored(call: BranchCall, branch: _Loaded) -> BranchCall:
    # The prepared branch is the truth: phase two runs on what was voted on.
    _, operation, payload = branch
    if call.operation == operation and call.payload == payload:
        return call
    return replace(call, operation=operation, payload=payload)


def _fence_epoch(conn: sqlite3.Connection, shard: str) -> int | None:
    row = conn.execute(_SQL_FENCE, (shard,)).fetchone()
    return None if row is None else int(row[0])


def _recorded(conn: sqlite3.Connection, call: BranchCall, op: Op) -> Result | None:
    row = conn.execute(_SQL_RECORDED, (call.gid, call.branch_id, op.value)).fetchone()
    return None if row is None else _result(row)


def _result(row: tuple[Any, ...]) -> Result:
    """A recorded answer from the first four columns of ``row`` (a barrier hit)."""
    return Result(_STATUS[row[0]], str(row[1]), bool(row[2]), bytes(row[3]), duplicate=True)


def _loaded(row: tuple[Any, ...]) -> _Loaded | None:
    """The branch part of a :data:`_SQL_LOOKUP` row (None: no branch row)."""
    if row[4] is None:
        return None
    return _STATE[row[4]], str(row[5]), bytes(row[6])


def _branch(row: tuple[Any, ...]) -> BranchRecord:
    gid, branch_id, operation, payload, state, address, shard, epoch, prepared_at = row
    return BranchRecord(
        gid=str(gid),
        branch_id=str(branch_id),
        operation=str(operation),
        payload=bytes(payload),
        state=BranchState(str(state)),
        coordinator_address=str(address),
        shard=str(shard),
        epoch=int(epoch),
        prepared_at=float(prepared_at),
    )
