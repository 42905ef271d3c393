"""PostgreSQL as a participant's database: a 2PC branch is a real prepared transaction.

Handlers are ``async def handler(conn: psycopg.AsyncConnection, call: BranchCall)`` and
run inside the branch's PostgreSQL transaction; the database's own row locks hold what a
prepared branch changed (no "reserved" columns needed). Connections come from a
``psycopg_pool.AsyncConnectionPool``; every transaction runs with ``lock_timeout``
(default 2 s).

Prepared transaction names
--------------------------
A branch ``(gid, branch_id)`` of the participant whose database has OID ``<db>`` is
prepared as::

    accord:<db>:<gid>/<branch_id>

gid and branch percent-encoded (UTF-8; every byte but ``A-Z a-z 0-9 _ . - ~ : @ + = ,``
is written ``%XX``, so ``/``, ``%``, quotes, spaces and control characters never appear
raw): e.g. ``accord:16384:s1:0190c1a2b3c4deadbeef00000001/b0``. Prepared transaction
names are unique per *server*, not per database, hence the database's OID: participants
in different databases of one server never clash. The encoding is reversible
(:func:`parse_transaction_name`) and injective, so two branches never share a name. A
name longer than PostgreSQL's limit (199 bytes) is refused before anything happens:
the call is answered INVALID_ARGUMENT ("gid and branch too long ..."). Names are always
sent as SQL literals (``psycopg.sql.Literal``), never concatenated into SQL text.

Tables
------
The SQLite barrier's tables (``accord_barrier``, ``accord_branches``, ``accord_audit``,
``accord_fence``; see :mod:`accord.participants._barrier`), created in the participant's
database, with the same UNIQUE (gid, branch_id, op) barrier. What differs is where
each row is written, because rows written inside a prepared transaction are invisible
(and their keys locked) until COMMIT PREPARED, and vanish with ROLLBACK PREPARED:

- The branch row (state PREPARED, the coordinator to ask, shard, epoch, operation and
  payload) is committed on its own *before* the branch's transaction starts (an
  asynchronous commit: the PREPARE TRANSACTION that follows flushes the WAL up to and
  past it). So any instance can see which coordinator to ask about a prepared branch.
- The prepare barrier row and the PREPARED audit row are written *inside* the branch's
  transaction: they become visible exactly when COMMIT PREPARED makes the business
  change visible, and are rolled back with it.
- The fence is raised by its own statement (never inside a prepared transaction, where
  its row lock would stall every other branch of the shard until the outcome).

So the state of a branch is read from the database alone: ``pg_prepared_xacts`` has its
name (held prepared), or else its prepare barrier row is visible with OK (it was
committed: COMMIT PREPARED happened), or REFUSED (a no vote, or aborted), or absent
(never prepared, or rolled back).

The calls
---------
- **Prepare**: recorded answer → returned (a duplicate). Name in ``pg_prepared_xacts``
  → a duplicate of a yes vote: answered "prepared". Otherwise: the branch row; BEGIN;
  INSERT the prepare barrier row (the UNIQUE key serialises duplicates and an Abort
  racing in); the handler; the PREPARED audit row; ``PREPARE TRANSACTION``; only then the
  yes vote. ``Refuse``, a lock wait past ``lock_timeout`` or a deadlock in the handler
  → ROLLBACK and a recorded no vote (ABORTED); ``NotYet`` → ROLLBACK, "not yet". A
  read-only vote commits the local transaction (no PREPARE) with the barrier row saying
  read-only. A branch already aborted (its Abort arrived first) is refused.
- **Commit** (from any connection of any instance): ``COMMIT PREPARED`` if the name is
  in ``pg_prepared_xacts``, then, in one local transaction, the commit barrier row, the
  commit handler if any (after the fact: the prepare handler did the work), the branch
  row's state and the audit row.
- **Abort**: the branch row marked ABORTING, ``ROLLBACK PREPARED``, then in one local
  transaction: a REFUSED prepare barrier row ("already aborted": a late or duplicate
  Prepare is refused, never run), the abort barrier row, the abort handler if the branch
  had been prepared, the branch row's state, the audit row. With nothing prepared and no
  prepare row, the same transaction is the recorded no-op of an Abort before its
  Prepare. If a Prepare of the branch is in progress, the INSERT of the REFUSED prepare
  row waits for it (up to ``lock_timeout``), then the Abort looks again.
- **One-phase Commit**: prepare and commit handlers in one local transaction with both
  barrier rows; a refusal is the outcome.
- **Execute** / **Compensate** (sagas): one local transaction with the barrier row, as on
  SQLite: a Compensate first records the Execute as refused (``INSERT ... ON CONFLICT DO
  NOTHING``, which waits for an Execute in flight), so a late Execute is refused. A lock
  wait past ``lock_timeout`` (or a deadlock) in a saga handler is answered "not yet":
  the step's retry policy retries it, as for ``NotYet``, rather than failing the step for
  good on a transient conflict.

Crash windows of Commit and Abort
---------------------------------
- COMMIT PREPARED done, outcome row not written (crash, lost connection): the name is
  gone from ``pg_prepared_xacts`` and the prepare barrier row is visible with OK (it
  became visible at COMMIT PREPARED). The retried Commit sees exactly that and records
  COMMITTED (running the commit handler once); a late Abort sees it and is refused
  ("already committed"). The branch row still says PREPARED, so the in-doubt resolver
  also finishes it by asking the coordinator.
- ROLLBACK PREPARED done, outcome not written: the prepare barrier row is gone with the
  rolled-back transaction and the branch row says ABORTING (written before the
  ROLLBACK PREPARED). The retried Abort records ABORTED; a late Prepare is refused
  ("already aborted"); a Commit is refused (CONFLICT).
- Crash after the branch row and before PREPARE TRANSACTION: nothing is prepared and
  no prepare row exists; the retried Prepare runs again (the branch row is reused), an
  Abort records an abort-before-prepare, and the resolver (the branch row says
  PREPARED) asks the coordinator, which aborts it.
- Crash after PREPARE TRANSACTION, before the vote was sent: the branch is prepared
  and the coordinator's retry is answered "prepared"; if the coordinator never comes
  back, the resolver of any instance asks it (or its shard's owner) after
  ``in_doubt_after_s``.

A PostgreSQL error that is the connection's (server restarting, connection lost) is
answered "not yet": the coordinator retries, and the barrier makes the retry safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, unquote

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from accord.participants._app import Participant
from accord.participants._backend import BackendStartError, PendingBranch
from accord.participants._barrier import (
    _ABORTED,
    _COMMITTED,
    _COMPENSATED,
    _EXECUTED,
    _LATE_EXECUTE,
    _NOTHING_TO_COMPENSATE,
    _NULL_COMPENSATION,
    _PREPARED,
    _READ_ONLY,
    OP_ONE_PHASE_COMMIT,
    SOURCE_COORDINATOR,
    SOURCE_RESOLVER,
    BranchRecord,
    BranchState,
    Outcome,
    _out,
    _vote,
)
from accord.participants._pg_failpoints import PgFailpoint, PgFailpoints
from accord.participants._types import BranchCall, NotYet, Op, Refuse, Result, Status, Vote

log = logging.getLogger("accord.participant")

#: Every Accord prepared transaction's name starts with this.
NAME_PREFIX = "accord:"
#: PostgreSQL's limit on a prepared transaction's name (GIDSIZE 200, with the NUL).
MAX_NAME_BYTES = 199
_SAFE = ":@+=,~"

DEFAULT_LOCK_TIMEOUT_S = 2.0
DEFAULT_POOL_SIZE = 20
#: How long the start-up schema set-up may wait on a lock.
SETUP_LOCK_TIMEOUT_S = 30

SCHEMA = """
CREATE TABLE IF NOT EXISTS accord_barrier (
    gid        text NOT NULL,
    branch_id  text NOT NULL,
    op         text NOT NULL,
    status     text NOT NULL,
    message    text NOT NULL DEFAULT '',
    read_only  boolean NOT NULL DEFAULT false,
    result     bytea NOT NULL DEFAULT '\\x'::bytea,
    created_at double precision NOT NULL,
    PRIMARY KEY (gid, branch_id, op)
);
CREATE TABLE IF NOT EXISTS accord_branches (
    gid                 text NOT NULL,
    branch_id           text NOT NULL,
    operation           text NOT NULL,
    payload             bytea NOT NULL,
    state               text NOT NULL
        CHECK (state IN ('PREPARED', 'READ_ONLY', 'COMMITTED', 'ABORTED', 'ABORTING')),
    coordinator_address text NOT NULL DEFAULT '',
    shard               text NOT NULL DEFAULT '',
    epoch               bigint NOT NULL DEFAULT 0,
    prepared_at         double precision NOT NULL,
    updated_at          double precision NOT NULL,
    PRIMARY KEY (gid, branch_id)
);
CREATE INDEX IF NOT EXISTS accord_branches_open ON accord_branches (prepared_at)
    WHERE state IN ('PREPARED', 'ABORTING');
CREATE TABLE IF NOT EXISTS accord_audit (
    seq                 bigserial PRIMARY KEY,
    gid                 text NOT NULL,
    branch_id           text NOT NULL,
    op                  text NOT NULL,
    outcome             text NOT NULL,
    source              text NOT NULL,
    shard               text NOT NULL DEFAULT '',
    epoch               bigint NOT NULL DEFAULT 0,
    coordinator_address text NOT NULL DEFAULT '',
    detail              text NOT NULL DEFAULT '',
    at                  double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS accord_fence (
    shard      text PRIMARY KEY,
    epoch      bigint NOT NULL,
    updated_at double precision NOT NULL
);
"""

#: Serialises schema creation by several instances starting together.
_SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('accord.participant.schema'))"

_SQL_LOOKUP = """
SELECT (SELECT epoch FROM accord_fence WHERE shard = %(shard)s),
       r.status, r.message, r.read_only, r.result,
       EXISTS (SELECT 1 FROM pg_prepared_xacts
               WHERE gid = %(name)s AND database = current_database()),
       b.state
FROM (SELECT 1) AS k
LEFT JOIN accord_barrier AS r
    ON r.gid = %(gid)s AND r.branch_id = %(branch)s AND r.op = %(op)s
LEFT JOIN accord_branches AS b ON b.gid = %(gid)s AND b.branch_id = %(branch)s
"""
_SQL_RECORDED = (
    "SELECT status, message, read_only, result FROM accord_barrier"
    " WHERE gid = %s AND branch_id = %s AND op = %s"
)
_SQL_RECORD = (
    "INSERT INTO accord_barrier (gid, branch_id, op, status, message, read_only, result,"
    " created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
)
_SQL_RECORD_IF_NEW = _SQL_RECORD + " ON CONFLICT (gid, branch_id, op) DO NOTHING"
_SQL_REANSWER = (
    "UPDATE accord_barrier SET status = %s, message = %s, read_only = %s, result = %s"
    " WHERE gid = %s AND branch_id = %s AND op = %s"
)
_SQL_INTENT = (
    "INSERT INTO accord_branches (gid, branch_id, operation, payload, state,"
    " coordinator_address, shard, epoch, prepared_at, updated_at)"
    " VALUES (%s, %s, %s, %s, 'PREPARED', %s, %s, %s, %s, %s)"
    " ON CONFLICT (gid, branch_id) DO NOTHING"
)
_SQL_UPSERT_BRANCH = (
    "INSERT INTO accord_branches (gid, branch_id, operation, payload, state,"
    " coordinator_address, shard, epoch, prepared_at, updated_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (gid, branch_id) DO UPDATE SET state = excluded.state,"
    " updated_at = excluded.updated_at"
)
_SQL_SET_STATE = (
    "UPDATE accord_branches SET state = %s, updated_at = %s"
    " WHERE gid = %s AND branch_id = %s AND state = ANY(%s)"
)
_SQL_BRANCH = (
    "SELECT state, operation, payload FROM accord_branches WHERE gid = %s AND branch_id = %s"
)
_SQL_AUDIT = (
    "INSERT INTO accord_audit (gid, branch_id, op, outcome, source, shard, epoch,"
    " coordinator_address, detail, at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_SQL_RAISE_FENCE = (
    "INSERT INTO accord_fence (shard, epoch, updated_at) VALUES (%s, %s, %s)"
    " ON CONFLICT (shard) DO UPDATE SET epoch = excluded.epoch,"
    " updated_at = excluded.updated_at WHERE accord_fence.epoch < excluded.epoch"
)
_SQL_EXECUTED = (
    "SELECT status FROM accord_barrier WHERE gid = %s AND branch_id = %s AND op = 'execute'"
)
_SQL_PREPARED_XACTS = (
    "SELECT gid, extract(epoch FROM prepared)::float8 FROM pg_prepared_xacts"
    " WHERE database = current_database() AND gid LIKE 'accord:%%' ORDER BY prepared"
)
_SQL_OPEN_BRANCHES = (
    "SELECT gid, branch_id, operation, payload, state, coordinator_address, shard, epoch,"
    " prepared_at FROM accord_branches WHERE state IN ('PREPARED', 'ABORTING')"
)
_SQL_DB_OID = "SELECT oid FROM pg_database WHERE datname = current_database()"
_SQL_COUNT_PREPARED = (
    "SELECT count(*) FROM pg_prepared_xacts"
    " WHERE database = current_database() AND gid LIKE 'accord:%%'"
)

#: Lock conflicts that make a branch's handler give up (a no vote in Prepare, "not yet"
#: in a saga step).
_LOCK_ERRORS = (errors.LockNotAvailable, errors.DeadlockDetected)
_NOT_PREPARED = "ABORTING"


class NameTooLong(ValueError):
    pass


def transaction_name(db_oid: int, gid: str, branch_id: str) -> str:
    """The prepared transaction name of a branch of the database with OID ``db_oid``
    (module docstring); :class:`NameTooLong` when it would exceed PostgreSQL's 199
    bytes."""
    name = f"{NAME_PREFIX}{db_oid}:{quote(gid, safe=_SAFE)}/{quote(branch_id, safe=_SAFE)}"
    size = len(name.encode())
    if size > MAX_NAME_BYTES:
        raise NameTooLong(
            f"gid and branch too long for a PostgreSQL prepared transaction name: {size} bytes"
            f" encoded (accord:<db>:<gid>/<branch>), at most {MAX_NAME_BYTES}"
        )
    return name


def parse_transaction_name(name: str) -> tuple[int, str, str] | None:
    """``(db_oid, gid, branch_id)`` of an Accord transaction name; None for any other
    name."""
    if not name.startswith(NAME_PREFIX) or name.count("/") != 1:
        return None
    db, sep, rest = name[len(NAME_PREFIX) :].partition(":")
    if not sep or not db.isdigit():
        return None
    gid, branch = rest.split("/")
    return int(db), unquote(gid), unquote(branch)


def describe_url(url: str) -> str:
    """``user@host:port/dbname`` of a connection URL (never its password)."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.Error:
        return "(unparseable URL)"
    host = info.get("host") or "localhost"
    port = info.get("port") or "5432"
    user = f"{info['user']}@" if info.get("user") else ""
    return f"{user}{host}:{port}/{info.get('dbname') or ''}"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def connect_error(url: str, err: BaseException) -> BackendStartError:
    """One line naming why a connection to ``url`` failed."""
    where = describe_url(url)
    text = _one_line(err)
    low = text.lower()
    if isinstance(err, psycopg.ProgrammingError) or (
        "invalid" in low and any(w in low for w in ("uri", "option", "value", "missing"))
    ):
        why = "invalid PostgreSQL URL"
    elif "does not exist" in low and "database" in low:
        why = "the database does not exist"
    elif "password" in low or "authentication" in low or "role" in low:
        why = "authentication failed (user or password)"
    elif "refused" in low or "timeout" in low or "could not translate" in low or "no route" in low:
        why = "server unreachable"
    else:
        why = "cannot connect"
    return BackendStartError(f"PostgreSQL at {where}: {why}: {text}")


@dataclass(frozen=True, slots=True)
class _Look:
    """What one round trip tells about a call before it runs."""

    fence: int | None
    recorded: Result | None
    prepared: bool
    state: str | None


async def _maybe(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _recorded(row: Any) -> Result:
    return Result(Status(row[0]), str(row[1]), bool(row[2]), bytes(row[3]), duplicate=True)


class PostgresBackend:
    """A participant's database in PostgreSQL (see the module docstring)."""

    kind = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
        pool_size: int = DEFAULT_POOL_SIZE,
        connect_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if lock_timeout_s <= 0 or pool_size < 1:
            raise ValueError("lock_timeout_s must be > 0 and pool_size >= 1")
        self.url = url
        self.lock_timeout_s = lock_timeout_s
        self.pool_size = pool_size
        self.connect_timeout_s = connect_timeout_s
        self._clock = clock
        self._p: Participant | None = None
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self._gauge: psycopg.Connection[Any] | None = None
        self._gauge_lock = threading.Lock()
        self._tasks: set[asyncio.Task[Result]] = set()
        self._failpoints = PgFailpoints()
        #: The database's OID, part of every prepared transaction name (from start()).
        self.db_oid = 0

    @property
    def location(self) -> str:
        return f"postgresql://{describe_url(self.url)}"

    @property
    def pool(self) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
        if self._pool is None:
            raise RuntimeError("PostgreSQL backend is not started")
        return self._pool

    # -- life cycle ----------------------------------------------------------------------

    async def start(self, participant: Participant) -> None:
        self._p = participant
        try:
            self._failpoints = PgFailpoints.from_env()
        except ValueError as e:
            raise BackendStartError(str(e)) from None
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout_s))
            )
        except psycopg.Error as e:
            raise connect_error(self.url, e) from None
        try:
            row = await (await conn.execute("SHOW max_prepared_transactions")).fetchone()
            if row is None or int(row[0]) == 0:
                raise BackendStartError(
                    f"PostgreSQL at {describe_url(self.url)} has max_prepared_transactions = 0;"
                    " set it to at least the number of concurrent branches (e.g. 100) in"
                    " postgresql.conf and restart"
                )
            row = await (await conn.execute(_SQL_DB_OID)).fetchone()
            assert row is not None
            self.db_oid = int(row[0])
            await conn.execute("BEGIN")
            # A set-up that waits on a row a prepared branch holds would wait for ever:
            # only this participant, once it serves, can finish that branch. Fail with
            # one line instead.
            await conn.execute(f"SET LOCAL lock_timeout = '{SETUP_LOCK_TIMEOUT_S}s'")
            await conn.execute(_SCHEMA_LOCK)
            await conn.execute(SCHEMA)
            setup: Any = participant.setup
            await _maybe(setup(conn))
            await conn.execute("COMMIT")
        except psycopg.Error as e:
            raise BackendStartError(
                f"PostgreSQL at {describe_url(self.url)}: schema set-up failed: {_one_line(e)}"
            ) from None
        finally:
            await conn.close()
        ms = max(1, round(self.lock_timeout_s * 1000))
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            self.url,
            min_size=min(2, self.pool_size),
            max_size=self.pool_size,
            kwargs={"autocommit": True, "options": f"-c lock_timeout={ms}"},
            open=False,
            name=f"accord-{participant.service}",
        )
        await pool.open(wait=True, timeout=self.connect_timeout_s)
        self._pool = pool

    async def stop(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        with self._gauge_lock:
            if self._gauge is not None:
                self._gauge.close()
                self._gauge = None

    # -- calls ---------------------------------------------------------------------------

    async def call(self, op: Op, call: BranchCall, *, fence: bool) -> Result:
        name = ""
        if op in (Op.PREPARE, Op.COMMIT, Op.ABORT):
            try:
                name = transaction_name(self.db_oid, call.gid, call.branch_id)
            except NameTooLong as e:
                return Result(Status.INVALID, str(e))
        # Like the SQLite store, a cancelled caller does not cancel the call's work: it
        # runs to its end (a prepared transaction is never left half-made by a deadline),
        # and the coordinator's retry is answered by the barrier.
        task = asyncio.create_task(self._call(op, call, name, fence))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    async def _call(self, op: Op, call: BranchCall, name: str, fence: bool) -> Result:
        try:
            async with self.pool.connection() as conn:
                run = _Call(self, conn, op, call, name, fence)
                return await run.run()
        except (errors.LockNotAvailable, errors.DeadlockDetected) as e:
            return Result(Status.NOT_YET, f"lock conflict: {_one_line(e)}")
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            return Result(Status.NOT_YET, f"database unavailable: {_one_line(e)}")

    # -- queries -------------------------------------------------------------------------

    async def in_doubt(self, older_than_s: float) -> list[BranchRecord]:
        before = self._clock() - older_than_s
        async with self.pool.connection() as conn:
            rows = await (
                await conn.execute(
                    _SQL_OPEN_BRANCHES + " AND prepared_at <= %s ORDER BY prepared_at", (before,)
                )
            ).fetchall()
        return [_branch(row) for row in rows]

    async def branch_counts(self) -> dict[str, int]:
        counts = {state.value: 0 for state in BranchState}
        async with self.pool.connection() as conn:
            for state, n in await (
                await conn.execute("SELECT state, count(*) FROM accord_branches GROUP BY state")
            ).fetchall():
                if state in counts:
                    counts[state] = int(n)
            row = await (await conn.execute(_SQL_COUNT_PREPARED)).fetchone()
        # Held prepared is what PostgreSQL holds prepared, whatever the rows say.
        counts[BranchState.PREPARED.value] = int(row[0]) if row else 0
        return counts

    async def pending(self) -> list[PendingBranch]:
        async with self.pool.connection() as conn:
            return await pending_on(conn, self._clock())

    def prepared_gauge(self) -> int | None:
        with self._gauge_lock:
            try:
                if self._gauge is None or self._gauge.closed:
                    self._gauge = psycopg.connect(self.url, autocommit=True, connect_timeout=2)
                row = self._gauge.execute(_SQL_COUNT_PREPARED).fetchone()
            except psycopg.Error:
                if self._gauge is not None:
                    self._gauge.close()
                    self._gauge = None
                return None
        return int(row[0]) if row else None


async def pending_on(conn: psycopg.AsyncConnection[Any], now: float) -> list[PendingBranch]:
    """Every Accord branch held prepared in ``conn``'s database, oldest first, with the
    coordinator it will ask (from its branch row)."""
    xacts = await (await conn.execute(_SQL_PREPARED_XACTS)).fetchall()
    if not xacts:
        return []
    oid_row = await (await conn.execute(_SQL_DB_OID)).fetchone()
    db_oid = int(oid_row[0]) if oid_row else 0
    rows = await (await conn.execute(_SQL_OPEN_BRANCHES)).fetchall()
    by_name = {}
    for row in rows:
        try:
            by_name[transaction_name(db_oid, str(row[0]), str(row[1]))] = _branch(row)
        except NameTooLong:
            continue
    out = []
    for xact_name, prepared_at in xacts:
        branch = by_name.get(xact_name)
        parsed = parse_transaction_name(xact_name) or (0, "", "")
        out.append(
            PendingBranch(
                gid=branch.gid if branch else parsed[1],
                branch_id=branch.branch_id if branch else parsed[2],
                age_s=max(0.0, now - float(prepared_at)),
                coordinator_address=branch.coordinator_address if branch else "",
                shard=branch.shard if branch else "",
                transaction=str(xact_name),
            )
        )
    return out


async def postgres_pending(url: str) -> list[PendingBranch]:
    """The prepared branches of the PostgreSQL participant database at ``url``."""
    try:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.Error as e:
        raise connect_error(url, e) from None
    try:
        return await pending_on(conn, time.time())
    except errors.UndefinedTable:
        return []
    finally:
        await conn.close()


def _branch(row: Any) -> BranchRecord:
    gid, branch_id, operation, payload, state, address, shard, epoch, prepared_at = row
    return BranchRecord(
        gid=str(gid),
        branch_id=str(branch_id),
        operation=str(operation),
        payload=bytes(payload),
        # ABORTING (rollback under way) is still held until its outcome is recorded.
        state=BranchState.PREPARED if state == _NOT_PREPARED else BranchState(str(state)),
        coordinator_address=str(address),
        shard=str(shard),
        epoch=int(epoch),
        prepared_at=float(prepared_at),
    )


class _Call:
    """One call on one pooled connection (autocommit: transactions are explicit)."""

    def __init__(
        self,
        backend: PostgresBackend,
        conn: psycopg.AsyncConnection[Any],
        op: Op,
        call: BranchCall,
        name: str,
        fence: bool,
    ) -> None:
        assert backend._p is not None
        self.p: Any = backend._p  # handlers take a psycopg connection here
        self.clock = backend._clock
        self._failpoints = backend._failpoints
        self.conn = conn
        self.op = op
        self.call = call
        self.name = name
        self.fence = fence

    # -- plumbing --------------------------------------------------------------------------

    async def x(self, query: Any, params: Any = None) -> psycopg.AsyncCursor[Any]:
        return await self.conn.execute(query, params)

    async def begin(self) -> None:
        await self.conn.execute("BEGIN")

    async def commit(self) -> None:
        await self.conn.execute("COMMIT")

    async def rollback(self) -> None:
        if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            await self.conn.execute("ROLLBACK")

    async def look(self, op: Op | None = None) -> _Look:
        c = self.call
        params = {
            "shard": c.shard,
            "name": self.name,
            "gid": c.gid,
            "branch": c.branch_id,
            "op": (op or self.op).value,
        }
        row = await (await self.x(_SQL_LOOKUP, params)).fetchone()
        assert row is not None
        recorded = None if row[1] is None else _recorded(row[1:5])
        return _Look(
            fence=None if row[0] is None else int(row[0]),
            recorded=recorded,
            prepared=bool(row[5]),
            state=None if row[6] is None else str(row[6]),
        )

    async def record(self, result: Result, *ops: Op, if_new: bool = False) -> bool:
        c, now, inserted = self.call, self.clock(), True
        for op in ops:
            cur = await self.x(
                _SQL_RECORD_IF_NEW if if_new else _SQL_RECORD,
                (
                    c.gid,
                    c.branch_id,
                    op.value,
                    result.status.value,
                    result.message,
                    result.read_only,
                    result.result,
                    now,
                ),
            )
            inserted = inserted and cur.rowcount == 1
        return inserted

    async def reanswer(self, result: Result, op: Op) -> None:
        c = self.call
        await self.x(
            _SQL_REANSWER,
            (
                result.status.value,
                result.message,
                result.read_only,
                result.result,
                c.gid,
                c.branch_id,
                op.value,
            ),
        )

    async def audit(self, result: Result, outcome: Outcome) -> None:
        c = self.call
        if outcome is Outcome.DUPLICATE:
            detail = f"{result.status.value}: {result.message}"
        else:
            detail = result.message
        await self.x(
            _SQL_AUDIT,
            (
                c.gid,
                c.branch_id,
                OP_ONE_PHASE_COMMIT if self.op is Op.COMMIT and c.one_phase else self.op.value,
                outcome.value,
                SOURCE_COORDINATOR if self.fence else SOURCE_RESOLVER,
                c.shard,
                c.epoch,
                c.coordinator_address,
                detail,
                self.clock(),
            ),
        )

    async def answered(self, result: Result, outcome: Outcome) -> Result:
        """An answer that changes nothing, audited on its own (autocommit)."""
        await self.audit(result, outcome)
        return result

    async def set_state(self, new: str, *old: str) -> None:
        c = self.call
        await self.x(_SQL_SET_STATE, (new, self.clock(), c.gid, c.branch_id, list(old)))

    async def upsert_branch(self, state: str) -> None:
        c, now = self.call, self.clock()
        await self.x(
            _SQL_UPSERT_BRANCH,
            (
                c.gid,
                c.branch_id,
                c.operation,
                c.payload,
                state,
                c.coordinator_address,
                c.shard,
                c.epoch,
                now,
                now,
            ),
        )

    async def stored(self) -> BranchCall:
        """The call as prepared (the prepared branch is the truth for phase two)."""
        row = await (await self.x(_SQL_BRANCH, (self.call.gid, self.call.branch_id))).fetchone()
        if row is None or (row[1] == self.call.operation and bytes(row[2]) == self.call.payload):
            return self.call
        return replace(self.call, operation=str(row[1]), payload=bytes(row[2]))

    async def finish_prepared(self, verb: str) -> str | None:
        """``COMMIT PREPARED`` or ``ROLLBACK PREPARED``; None when done, else why not
        ("gone": finished meanwhile by someone else; "busy": being finished now)."""
        try:
            await self.x(sql.SQL(f"{verb} PREPARED {{}}").format(sql.Literal(self.name)))
        except errors.UndefinedObject:
            return "gone"
        except errors.ObjectInUse:
            return "busy"
        return None

    # -- dispatch --------------------------------------------------------------------------

    async def run(self) -> Result:
        try:
            return await self._run()
        except BaseException:
            with contextlib.suppress(Exception):  # broken: the pool discards it
                await self.rollback()
            raise

    async def _run(self) -> Result:
        look = await self.look()
        c = self.call
        if self.fence and c.shard:
            seen, epoch = look.fence, c.epoch
            if seen is not None and 0 < epoch < seen:
                fenced = Result(
                    Status.FENCED, f"fenced: epoch {epoch} < {seen} for shard {c.shard!r}"
                )
                return await self.answered(fenced, Outcome.FENCED)
            if seen is None or epoch > seen:
                await self.x(_SQL_RAISE_FENCE, (c.shard, epoch, self.clock()))
        if look.recorded is not None:
            return await self.answered(look.recorded, Outcome.DUPLICATE)
        if self.op is Op.PREPARE:
            return await self.prepare(look)
        if self.op is Op.COMMIT:
            if c.one_phase and not look.prepared and look.state is None:
                return await self.one_phase()
            return await self.commit_branch(look)
        if self.op is Op.ABORT:
            return await self.abort(look)
        if self.op is Op.EXECUTE:
            return await self.execute()
        return await self.compensate()

    # -- 2PC -----------------------------------------------------------------------------

    async def prepare(self, look: _Look) -> Result:
        c = self.call
        if look.prepared:
            return await self.answered(replace(_PREPARED, duplicate=True), Outcome.DUPLICATE)
        if look.state in ("ABORTED", _NOT_PREPARED):
            # Rolled back; the Abort's record is being written (or was lost in a crash).
            return Result(Status.REFUSED, "already aborted")
        if look.state is None:
            # The branch row, committed first so that any instance knows whom to ask about
            # the prepared transaction. Asynchronous commit: PREPARE TRANSACTION flushes
            # the WAL past it before the vote.
            now = self.clock()
            async with self.conn.pipeline():
                await self.x("BEGIN")
                await self.x("SET LOCAL synchronous_commit = off")
                await self.x(
                    _SQL_INTENT,
                    (
                        c.gid,
                        c.branch_id,
                        c.operation,
                        c.payload,
                        c.coordinator_address,
                        c.shard,
                        c.epoch,
                        now,
                        now,
                    ),
                )
                await self.x("COMMIT")
        await self.begin()
        try:
            await self.record(_PREPARED, Op.PREPARE)
        except errors.UniqueViolation:
            # Answered meanwhile (an Abort before its Prepare, or a duplicate): that answer.
            await self.rollback()
            return await self.recorded_answer(Op.PREPARE)
        except errors.LockNotAvailable:
            await self.rollback()
            if (await self.look()).prepared:
                return await self.answered(replace(_PREPARED, duplicate=True), Outcome.DUPLICATE)
            return Result(Status.NOT_YET, "a duplicate of this prepare is in progress")
        try:
            vote = _vote(await _maybe(self.p.prepare(self.conn, c)))
        except Refuse as no:
            return await self.refuse_prepare(no.reason)
        except NotYet as later:
            await self.rollback()
            return Result(Status.NOT_YET, later.reason)
        except _LOCK_ERRORS as e:
            return await self.refuse_prepare(f"lock conflict: {_one_line(e)}")
        if vote is Vote.READ_ONLY:
            await self.reanswer(_READ_ONLY, Op.PREPARE)
            await self.set_state(BranchState.READ_ONLY.value, BranchState.PREPARED.value)
            await self.audit(_READ_ONLY, Outcome.READ_ONLY)
            await self.commit()
            return _READ_ONLY
        await self.audit(_PREPARED, Outcome.PREPARED)
        try:
            await self.x(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(self.name)))
        except psycopg.errors.OperationalError:
            raise
        except psycopg.Error as e:  # e.g. max_prepared_transactions reached
            await self.rollback()
            return Result(Status.NOT_YET, f"cannot prepare now: {_one_line(e)}")
        self._failpoints.check(PgFailpoint.AFTER_PG_PREPARE)
        return _PREPARED

    async def refusal(self, result: Result, op: Op, *, answer: Op) -> Result | None:
        """Rolls the handler's work back and, in a new local transaction, records
        ``result`` (a refusal) as ``op``'s answer; None with that transaction open, or,
        when another call answered ``op`` first, ``answer``'s recorded answer."""
        await self.rollback()
        await self.begin()
        if await self.record(result, op, if_new=True):
            return None
        await self.rollback()
        return await self.recorded_answer(answer)

    async def refuse_prepare(self, reason: str) -> Result:
        """A no vote: the handler's changes rolled back, the refusal recorded."""
        result = Result(Status.REFUSED, reason)
        if (earlier := await self.refusal(result, Op.PREPARE, answer=Op.PREPARE)) is not None:
            return earlier
        await self.set_state(BranchState.ABORTED.value, BranchState.PREPARED.value)
        await self.audit(result, Outcome.REFUSED)
        await self.commit()
        return result

    async def recorded_answer(self, op: Op) -> Result:
        c = self.call
        row = await (await self.x(_SQL_RECORDED, (c.gid, c.branch_id, op.value))).fetchone()
        if row is None:
            return Result(Status.NOT_YET, "answered concurrently; retry")
        return await self.answered(_recorded(row), Outcome.DUPLICATE)

    async def prepare_row(self) -> Any:
        c = self.call
        return await (
            await self.x(_SQL_RECORDED, (c.gid, c.branch_id, Op.PREPARE.value))
        ).fetchone()

    async def commit_branch(self, look: _Look) -> Result:
        c = self.call
        if look.prepared:
            self._failpoints.check(PgFailpoint.BEFORE_COMMIT_PREPARED)
            why = await self.finish_prepared("COMMIT")
            self._failpoints.check(PgFailpoint.AFTER_COMMIT_PREPARED)
            if why == "busy":
                return Result(Status.NOT_YET, "being finished by another session")
        await self.begin()
        prepared = await self.prepare_row()
        state = look.state
        if prepared is None or prepared[0] != Status.OK.value:
            await self.rollback()
            if c.one_phase:  # the answer of a one-phase commit is the outcome
                result = Result(Status.REFUSED, "already aborted")
                await self.begin()
                if not await self.record(result, Op.COMMIT, if_new=True):
                    await self.rollback()
                    return await self.recorded_answer(Op.COMMIT)
                await self.audit(result, Outcome.REFUSED)
                await self.commit()
                return result
            if prepared is None and state not in ("ABORTED", _NOT_PREPARED):
                conflict = Result(Status.CONFLICT, "commit without a prepare: no yes vote recorded")
            else:
                conflict = Result(Status.CONFLICT, "commit refused: branch already aborted")
            return await self.answered(conflict, Outcome.CONFLICT)
        if prepared[2]:  # read-only
            result = Result(Status.OK, "nothing to commit: branch is READ_ONLY")
            outcome = Outcome.NOOP
        else:
            result, outcome = _COMMITTED, Outcome.COMMITTED
        if not await self.record(result, Op.COMMIT, if_new=True):
            await self.rollback()
            return await self.recorded_answer(Op.COMMIT)
        if outcome is Outcome.COMMITTED:
            try:
                await _maybe(self.p.commit(self.conn, await self.stored()))
            except NotYet as later:
                await self.rollback()
                return Result(Status.NOT_YET, later.reason)
            except Refuse as no:
                raise RuntimeError(f"commit handler refused after a yes vote: {no}") from no
            await self.set_state(BranchState.COMMITTED.value, BranchState.PREPARED.value)
        await self.audit(result, outcome)
        await self.commit()
        return result

    async def abort(self, look: _Look) -> Result:
        rolled_back = False
        for _ in range(3):
            if look.prepared:
                # Marked first, so that a crash right after ROLLBACK PREPARED still tells
                # the retry that a prepared branch was rolled back (module docstring).
                await self.set_state(_NOT_PREPARED, BranchState.PREPARED.value)
                why = await self.finish_prepared("ROLLBACK")
                if why == "busy":
                    return Result(Status.NOT_YET, "being finished by another session")
                rolled_back = rolled_back or why is None
            answer = await self.record_abort(rolled_back)
            if answer is not None:
                return answer
            look = await self.look()
            if look.recorded is not None:  # a concurrent duplicate recorded it
                return await self.answered(look.recorded, Outcome.DUPLICATE)
        return Result(Status.NOT_YET, "a prepare of this branch is in progress")

    async def record_abort(self, rolled_back: bool) -> Result | None:
        """The abort's outcome in one local transaction; None when a Prepare of the branch
        is in progress (look again)."""
        c = self.call
        await self.begin()
        prepared = await self.prepare_row()
        if prepared is not None:
            if prepared[0] == Status.OK.value and not prepared[2]:
                await self.rollback()
                conflict = Result(Status.CONFLICT, "abort refused: branch already committed")
                return await self.answered(conflict, Outcome.CONFLICT)
            held = "READ_ONLY" if prepared[2] else "ABORTED"
            result = Result(Status.OK, f"no-op: branch holds nothing ({held})")
            outcome = Outcome.NOOP
        else:
            # Never prepared, or rolled back: refuse the late Prepare now (no hanging).
            branch = await (await self.x(_SQL_BRANCH, (c.gid, c.branch_id))).fetchone()
            was_prepared = rolled_back or (branch is not None and branch[0] == _NOT_PREPARED)
            late = Result(
                Status.REFUSED,
                "already aborted"
                if was_prepared
                else "already aborted: the abort arrived before the prepare",
            )
            try:
                await self.record(late, Op.PREPARE)
            except (errors.LockNotAvailable, errors.UniqueViolation):
                await self.rollback()  # a Prepare in progress: look again
                return None
            if was_prepared:
                try:
                    await _maybe(self.p.abort(self.conn, await self.stored()))
                except NotYet as later:
                    await self.rollback()
                    return Result(Status.NOT_YET, later.reason)
                except Refuse as no:
                    raise RuntimeError(f"abort handler refused: {no}") from no
                result, outcome = _ABORTED, Outcome.ABORTED
            else:
                result = Result(Status.OK, "no-op: aborted before prepare")
                outcome = Outcome.ABORTED_BEFORE_PREPARE
            await self.upsert_branch(BranchState.ABORTED.value)
        if not await self.record(result, Op.ABORT, if_new=True):
            await self.rollback()
            return await self.recorded_answer(Op.ABORT)
        await self.audit(result, outcome)
        await self.commit()
        return result

    async def one_phase(self) -> Result:
        c = self.call
        ok = Result(Status.OK, "committed (one phase)")
        await self.begin()
        try:
            await self.record(ok, Op.PREPARE, Op.COMMIT)
        except (errors.UniqueViolation, errors.LockNotAvailable):
            await self.rollback()
            return await self.commit_branch(await self.look())
        try:
            vote = _vote(await _maybe(self.p.prepare(self.conn, c)))
            if vote is not Vote.READ_ONLY:
                await _maybe(self.p.commit(self.conn, c))
        except Refuse as no:
            return await self.refuse_one_phase(no.reason)
        except _LOCK_ERRORS as e:
            return await self.refuse_one_phase(f"lock conflict: {_one_line(e)}")
        except NotYet as later:
            await self.rollback()
            return Result(Status.NOT_YET, later.reason)
        read_only = vote is Vote.READ_ONLY
        if read_only:
            ok = Result(Status.OK, "committed (one phase)", read_only=True)
            await self.reanswer(ok, Op.PREPARE)
            await self.reanswer(ok, Op.COMMIT)
        await self.upsert_branch(BranchState.COMMITTED.value)
        await self.audit(ok, Outcome.READ_ONLY if read_only else Outcome.COMMITTED)
        await self.commit()
        return ok

    async def refuse_one_phase(self, reason: str) -> Result:
        result = Result(Status.REFUSED, reason)
        if (earlier := await self.refusal(result, Op.PREPARE, answer=Op.COMMIT)) is not None:
            return earlier
        await self.record(result, Op.COMMIT)
        await self.upsert_branch(BranchState.ABORTED.value)
        await self.audit(result, Outcome.REFUSED)
        await self.commit()
        return result

    # -- sagas ---------------------------------------------------------------------------

    async def claim(self, result: Result, op: Op, what: str) -> Result | None:
        """Begins the step's transaction with its barrier row; None when claimed, else
        the answer: the recorded one (a duplicate), or "not yet" while a duplicate is
        still in progress (its row is locked past ``lock_timeout``)."""
        await self.begin()
        try:
            await self.record(result, op)
        except errors.UniqueViolation:
            await self.rollback()
            return await self.recorded_answer(op)
        except errors.LockNotAvailable:
            await self.rollback()
            return Result(Status.NOT_YET, f"a duplicate of this {what} is in progress")
        return None

    async def execute(self) -> Result:
        c = self.call
        answered = await self.claim(_EXECUTED, Op.EXECUTE, "step")
        if answered is not None:
            return answered
        try:
            out = await _maybe(self.p.execute(self.conn, c))
        except Refuse as no:
            result = Result(Status.REFUSED, no.reason)
            if (earlier := await self.refusal(result, Op.EXECUTE, answer=Op.EXECUTE)) is not None:
                return earlier
            await self.audit(result, Outcome.REFUSED)
            await self.commit()
            return result
        except NotYet as later:
            await self.rollback()
            return Result(Status.NOT_YET, later.reason)
        except _LOCK_ERRORS as e:
            await self.rollback()
            return Result(Status.NOT_YET, f"lock conflict (retried): {_one_line(e)}")
        result = _EXECUTED
        if out is not None:
            result = Result(Status.OK, "executed", result=_out(out))
            await self.reanswer(result, Op.EXECUTE)
        await self.audit(result, Outcome.EXECUTED)
        await self.commit()
        return result

    async def compensate(self) -> Result:
        c = self.call
        answered = await self.claim(_COMPENSATED, Op.COMPENSATE, "compensation")
        if answered is not None:
            return answered
        # Waits for an Execute in flight; inserted: the Execute never ran (and never will).
        if await self.record(_LATE_EXECUTE, Op.EXECUTE, if_new=True):
            result, outcome = _NULL_COMPENSATION, Outcome.NULL_COMPENSATION
        else:
            row = await (await self.x(_SQL_EXECUTED, (c.gid, c.branch_id))).fetchone()
            if row is None or row[0] != Status.OK.value:
                result, outcome = _NOTHING_TO_COMPENSATE, Outcome.NOOP
            else:
                try:
                    await _maybe(self.p.compensate(self.conn, c))
                except NotYet as later:
                    await self.rollback()
                    return Result(Status.NOT_YET, later.reason)
                except _LOCK_ERRORS as e:
                    await self.rollback()
                    return Result(Status.NOT_YET, f"lock conflict (retried): {_one_line(e)}")
                except Refuse as no:
                    await self.rollback()
                    log.error(
                        "event=compensate_refused gid=%s branch=%s operation=%s reason=%r"
                        " (a compensation must not refuse; answered not-yet, will be retried)",
                        c.gid,
                        c.branch_id,
                        c.operation,
                        no.reason,
                    )
                    return Result(Status.NOT_YET, f"compensation refused (retried): {no.reason}")
                result, outcome = _COMPENSATED, Outcome.COMPENSATED
        if result is not _COMPENSATED:
            await self.reanswer(result, Op.COMPENSATE)
        await self.audit(result, outcome)
        await self.commit()
        return result
