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

``accord_fence(shard, epoch, updated_at)``
    The highest coordinator epoch seen per WAL shard. A call with a lower epoch is
    refused ("fenced"); a higher one is recorded. Epoch 0 or an empty shard means no
    fencing (static single-node mode).

The rules, per op (after fencing and the duplicate check):

- Prepare: run the prepare handler. Yes → PREPARED; read-only → READ_ONLY; ``Refuse``
  → the handler's changes are undone, the no is recorded and the branch is ABORTED;
  ``NotYet`` → undone, nothing recorded (only a raised epoch is kept).
- Abort before any Prepare (the coordinator gave up on a Prepare still in flight): a
  recorded no-op that also records the Prepare as refused ("already aborted"), so the
  late Prepare is refused without running its handler — no resources are held by a
  branch nobody will ever finish (no hanging). A Compensate before its Execute will
  follow the same rule (the ``_CANCELS`` table).
- Commit: only of a PREPARED (or READ_ONLY: no-op) branch; otherwise FAILED_PRECONDITION.
  With ``one_phase``: prepare and commit handlers in one savepoint; a refusal is the
  outcome (ABORTED).
- Abort of a PREPARED branch runs the abort handler; of a refused, read-only or already
  aborted branch it is a no-op; of a committed one it is refused ("already committed").
"""

from __future__ import annotations

import enum
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from participants._app import Participant
from participants._store import undo_job
from participants._types import BranchCall, NotYet, Op, Refuse, Result, Status, Vote

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
    UNIQUE (gid, branch_id, op)
);
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
);
CREATE INDEX IF NOT EXISTS accord_branches_state ON accord_branches (state, prepared_at);
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


def create_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)


class Barrier:
    """Runs one call under the barrier rules. Synchronous: runs on the writer thread,
    inside the savepoint the store opened for the call. A handler's changes are undone
    with :func:`undo_job`, which is why the fence and barrier rows are written after the
    handler ran."""

    def __init__(self, participant: Participant, *, clock: Callable[[], float] = time.time) -> None:
        self._p = participant
        self._clock = clock

    def run(self, conn: sqlite3.Connection, op: Op, call: BranchCall, *, fence: bool) -> Result:
        """``fence=False`` only for the in-doubt resolver, which applies an outcome it
        got from the coordinator itself rather than a coordinator's command."""
        new_epoch: int | None = None
        if fence and call.shard:
            seen = _fence_epoch(conn, call.shard)
            if seen is not None and 0 < call.epoch < seen:
                return Result(
                    Status.FENCED, f"fenced: epoch {call.epoch} < {seen} for shard {call.shard!r}"
                )
            if seen is None or call.epoch > seen:
                new_epoch = call.epoch
        recorded = _recorded(conn, call, op)
        if recorded is not None:
            result = recorded
        elif op is Op.PREPARE:
            result = self._prepare(conn, call)
        elif op is Op.COMMIT:
            result = self._one_phase(conn, call) if call.one_phase else self._commit(conn, call)
        elif op is Op.ABORT:
            result = self._abort(conn, call)
        else:
            return Result(Status.UNIMPLEMENTED, f"{op} is not implemented yet")
        if new_epoch is not None:  # after any undo_job() of the handler
            conn.execute(
                "INSERT INTO accord_fence (shard, epoch, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (shard) DO UPDATE SET epoch = excluded.epoch,"
                " updated_at = excluded.updated_at",
                (call.shard, new_epoch, self._clock()),
            )
        return result

    # -- the ops ------------------------------------------------------------------------

    def _prepare(self, conn: sqlite3.Connection, call: BranchCall) -> Result:
        try:
            vote = _vote(self._p.prepare(conn, call))
        except Refuse as no:
            undo_job(conn)
            result = Result(Status.REFUSED, no.reason)
            self._record(conn, call, result, Op.PREPARE)
            self._insert_branch(conn, call, BranchState.ABORTED)
            return result
        except NotYet as later:
            undo_job(conn)
            return Result(Status.NOT_YET, later.reason)
        if vote is Vote.READ_ONLY:
            result = Result(Status.OK, "read-only", read_only=True)
            state = BranchState.READ_ONLY
        else:
            result, state = Result(Status.OK, "prepared"), BranchState.PREPARED
        self._record(conn, call, result, Op.PREPARE)
        # A plain INSERT: a branch row without a prepare barrier row cannot exist, and
        # if it did, the PRIMARY KEY would fail this call loudly (INTERNAL).
        self._insert_branch(conn, call, state)
        return result

    def _commit(self, conn: sqlite3.Connection, call: BranchCall) -> Result:
        branch = _load_branch(conn, call)
        if branch is None:
            return Result(Status.CONFLICT, "commit without a prepare: no yes vote recorded")
        return self._commit_branch(conn, call, branch)

    def _commit_branch(
        self, conn: sqlite3.Connection, call: BranchCall, branch: BranchRecord
    ) -> Result:
        if branch.state is BranchState.ABORTED:
            if call.one_phase:  # the answer of a one-phase commit is the outcome
                result = Result(Status.REFUSED, "already aborted")
                self._record(conn, call, result, Op.COMMIT)
                return result
            return Result(Status.CONFLICT, "commit refused: branch already aborted")
        if branch.state is BranchState.PREPARED:
            try:
                self._p.commit(conn, _stored(call, branch))
            except NotYet as later:
                undo_job(conn)
                return Result(Status.NOT_YET, later.reason)
            except Refuse as no:
                raise RuntimeError(f"commit handler refused after a yes vote: {no}") from no
            self._set_state(conn, call, BranchState.PREPARED, BranchState.COMMITTED)
            result = Result(Status.OK, "committed")
        else:  # READ_ONLY (COMMITTED is answered by the barrier row)
            result = Result(Status.OK, f"nothing to commit: branch is {branch.state}")
        self._record(conn, call, result, Op.COMMIT)
        return result

    def _one_phase(self, conn: sqlite3.Connection, call: BranchCall) -> Result:
        # Every recorded prepare (and abort-before-prepare) has a branch row.
        branch = _load_branch(conn, call)
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
            return result
        except NotYet as later:
            undo_job(conn)
            return Result(Status.NOT_YET, later.reason)
        read_only = vote is Vote.READ_ONLY
        result = Result(Status.OK, "committed (one phase)", read_only=read_only)
        self._record(conn, call, result, Op.PREPARE, Op.COMMIT)
        self._insert_branch(conn, call, BranchState.COMMITTED)
        return result

    def _abort(self, conn: sqlite3.Connection, call: BranchCall) -> Result:
        # Every recorded prepare (and abort-before-prepare) has a branch row.
        branch = _load_branch(conn, call)
        if branch is None:
            # Abort before Prepare: refuse the late Prepare in advance (no hanging).
            late = Result(Status.REFUSED, "already aborted: the abort arrived before the prepare")
            self._record(conn, call, late, _CANCELS[Op.ABORT])
            self._insert_branch(conn, call, BranchState.ABORTED)
            result = Result(Status.OK, "no-op: aborted before prepare")
        elif branch.state is BranchState.COMMITTED:
            return Result(Status.CONFLICT, "abort refused: branch already committed")
        elif branch.state is BranchState.PREPARED:
            try:
                self._p.abort(conn, _stored(call, branch))
            except NotYet as later:
                undo_job(conn)
                return Result(Status.NOT_YET, later.reason)
            except Refuse as no:
                raise RuntimeError(f"abort handler refused: {no}") from no
            self._set_state(conn, call, BranchState.PREPARED, BranchState.ABORTED)
            result = Result(Status.OK, "aborted")
        else:
            result = Result(Status.OK, f"no-op: branch holds nothing ({branch.state})")
        self._record(conn, call, result, Op.ABORT)
        return result

    # -- rows ---------------------------------------------------------------------------

    def _record(self, conn: sqlite3.Connection, call: BranchCall, result: Result, *ops: Op) -> None:
        # A plain INSERT: the row was checked absent in this same transaction, so a
        # conflict would be a bug and must fail loudly.
        now = self._clock()
        for op in ops:
            conn.execute(
                "INSERT INTO accord_barrier (gid, branch_id, op, status, message, read_only,"
                " result, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
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
        self, conn: sqlite3.Connection, call: BranchCall, state: BranchState
    ) -> None:
        now = self._clock()
        conn.execute(
            "INSERT INTO accord_branches (gid, branch_id, operation, payload, state,"
            " coordinator_address, shard, epoch, prepared_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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

    def _set_state(
        self, conn: sqlite3.Connection, call: BranchCall, old: BranchState, new: BranchState
    ) -> None:
        cur = conn.execute(
            "UPDATE accord_branches SET state = ?, updated_at = ?"
            " WHERE gid = ? AND branch_id = ? AND state = ?",
            (new.value, self._clock(), call.gid, call.branch_id, old.value),
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


def _stored(call: BranchCall, branch: BranchRecord) -> BranchCall:
    # The prepared branch is the truth: phase two runs on what was voted on.
    if call.operation == branch.operation and call.payload == branch.payload:
        return call
    return replace(call, operation=branch.operation, payload=branch.payload)


def _fence_epoch(conn: sqlite3.Connection, shard: str) -> int | None:
    row = conn.execute("SELECT epoch FROM accord_fence WHERE shard = ?", (shard,)).fetchone()
    return None if row is None else int(row[0])


def _recorded(conn: sqlite3.Connection, call: BranchCall, op: Op) -> Result | None:
    row = conn.execute(
        "SELECT status, message, read_only, result FROM accord_barrier"
        " WHERE gid = ? AND branch_id = ? AND op = ?",
        (call.gid, call.branch_id, op.value),
    ).fetchone()
    if row is None:
        return None
    return Result(Status(row[0]), str(row[1]), bool(row[2]), bytes(row[3]))


def _load_branch(conn: sqlite3.Connection, call: BranchCall) -> BranchRecord | None:
    row = conn.execute(
        "SELECT gid, branch_id, operation, payload, state, coordinator_address, shard, epoch,"
        " prepared_at FROM accord_branches WHERE gid = ? AND branch_id = ?",
        (call.gid, call.branch_id),
    ).fetchone()
    return None if row is None else _branch(row)


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
