"""The seam between the service layer and the participant's database.

A :class:`Backend` runs one branch call (barrier, fencing, audit and the business
handler, in the database's local transaction(s)) and answers what the in-doubt resolver
and the operator ask of the branch table. Two implementations:

- :class:`SqliteBackend` (the default): today's code path unchanged, the
  :class:`~accord.participants._barrier.Barrier` on the :class:`Store`'s group-committed
  writer thread;
- :class:`accord.participants._pg.PostgresBackend`: PostgreSQL through a psycopg 3 async
  connection pool, a 2PC branch being a real prepared transaction (``PREPARE
  TRANSACTION``).

:func:`open_backend` picks one from the ``db`` string: a ``postgresql://`` or
``postgres://`` URL is PostgreSQL, anything else a SQLite path. PostgreSQL support is
imported only when a URL asks for it (psycopg costs a SQLite participant nothing).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from accord.participants._app import Participant
from accord.participants._barrier import (
    Barrier,
    BranchRecord,
    branch_counts,
    create_schema,
    in_doubt,
)
from accord.participants._store import Store
from accord.participants._types import BranchCall, Op, Result

#: What a ``db`` string may start with to name a PostgreSQL database.
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class BackendStartError(RuntimeError):
    """participants: the database cannot be used (unreachable, refused, misconfigured).
    Its message is one line saying why; the command line prints it and exits non-zero."""


@dataclass(frozen=True, kw_only=True)
class PendingBranch:
    """A branch held prepared, as ``accord participant pending`` lists it."""

    gid: str
    branch_id: str
    #: Seconds since the branch was prepared.
    age_s: float
    #: The coordinator the in-doubt resolver will ask (from the Prepare), and its shard.
    coordinator_address: str
    shard: str
    #: PostgreSQL's prepared transaction name (``pg_prepared_xacts.gid``); "" on SQLite.
    transaction: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "gid": self.gid,
            "branch_id": self.branch_id,
            "age_s": round(self.age_s, 3),
            "coordinator_address": self.coordinator_address,
            "shard": self.shard,
            "transaction": self.transaction,
        }


@runtime_checkable
class Backend(Protocol):
    """A participant's database as the service layer uses it."""

    #: ``sqlite`` or ``postgresql``.
    kind: str

    @property
    def location(self) -> str:
        """Where the data is (a path, or a URL without its password), for logs."""
        ...

    async def start(self, participant: Participant) -> None:
        """Connects (creating what is missing: the SDK's tables, then the participant's
        own through its ``setup``). Raises :class:`BackendStartError` for a database
        that cannot be used."""
        ...

    async def stop(self) -> None:
        """Finishes calls in progress and disconnects. Safe to call twice."""
        ...

    async def call(self, op: Op, call: BranchCall, *, fence: bool) -> Result:
        """One participant call under the barrier rules (DESIGN guarantees 5 and 7);
        returns once its effect and its barrier and audit rows are durable.
        ``fence=False`` only for the in-doubt resolver."""
        ...

    async def in_doubt(self, older_than_s: float) -> list[BranchRecord]:
        """Branches held prepared for longer than ``older_than_s`` seconds."""
        ...

    async def branch_counts(self) -> dict[str, int]:
        """Number of branches per state (``PREPARED`` = held prepared now)."""
        ...

    async def pending(self) -> list[PendingBranch]:
        """Every branch held prepared now, oldest first."""
        ...

    def prepared_gauge(self) -> int | None:
        """Branches held prepared, read from any thread (a metrics scrape); None when
        it cannot be read now."""
        ...


def is_postgres_url(db: object) -> bool:
    return isinstance(db, str) and db.startswith(POSTGRES_SCHEMES)


def open_backend(db: Path | str | Backend, **options: Any) -> Backend:
    """The backend ``db`` names: a :class:`Backend` as it is, a ``postgresql://`` (or
    ``postgres://``) URL PostgreSQL (``options`` go to :class:`PostgresBackend`), anything
    else a SQLite path (``options``: ``max_batch``)."""
    if isinstance(db, Backend):
        return db
    if is_postgres_url(db):
        from accord.participants._pg import PostgresBackend

        pg_options = {k: v for k, v in options.items() if k != "max_batch"}
        return PostgresBackend(str(db), **pg_options)
    return SqliteBackend(Store(db, max_batch=options.get("max_batch", 256)))


class SqliteBackend:
    """SQLite: each call runs through the :class:`Barrier` in its own savepoint of the
    :class:`Store`'s next group commit."""

    kind = "sqlite"

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._barrier: Barrier | None = None
        self._gauge: sqlite3.Connection | None = None

    @property
    def location(self) -> str:
        return str(self.store.path)

    def bind(self, participant: Participant) -> None:
        """Builds the barrier for ``participant`` (before any call)."""
        self._barrier = Barrier(participant, clock=self.clock, cache=self.store.cache)

    @property
    def barrier(self) -> Barrier:
        if self._barrier is None:
            raise RuntimeError("backend not bound to a participant")
        return self._barrier

    async def start(self, participant: Participant) -> None:
        if self._barrier is None:
            self.bind(participant)

        def setup(conn: sqlite3.Connection) -> None:
            create_schema(conn)
            participant.setup(conn)

        await self.store.open(setup)

    async def stop(self) -> None:
        await self.store.close()
        if self._gauge is not None:
            self._gauge.close()
            self._gauge = None

    async def call(self, op: Op, call: BranchCall, *, fence: bool) -> Result:
        barrier = self._barrier
        assert barrier is not None, "backend not bound to a participant"
        return await self.store.write(lambda conn: barrier.run(conn, op, call, fence=fence))

    async def in_doubt(self, older_than_s: float) -> list[BranchRecord]:
        before = self.clock() - older_than_s
        return await self.store.read(lambda conn: in_doubt(conn, before))

    async def branch_counts(self) -> dict[str, int]:
        return await self.store.read(branch_counts)

    async def pending(self) -> list[PendingBranch]:
        now = self.clock()
        return [_pending(b, now) for b in await self.store.read(lambda c: in_doubt(c, now))]

    def prepared_gauge(self) -> int | None:
        # Its own read-only connection: the writer thread is never asked.
        try:
            if self._gauge is None:
                self._gauge = sqlite3.connect(
                    f"file:{self.store.path}?mode=ro", uri=True, check_same_thread=False
                )
            row = self._gauge.execute(
                "SELECT COUNT(*) FROM accord_branches WHERE state = 'PREPARED'"
            ).fetchone()
        except sqlite3.Error:
            return None
        return int(row[0])


def _pending(branch: BranchRecord, now: float) -> PendingBranch:
    return PendingBranch(
        gid=branch.gid,
        branch_id=branch.branch_id,
        age_s=max(0.0, now - branch.prepared_at),
        coordinator_address=branch.coordinator_address,
        shard=branch.shard,
    )


def sqlite_pending(path: Path | str) -> list[PendingBranch]:
    """The prepared branches of a SQLite participant file, read-only (the participant may
    be running or dead)."""
    from accord.participants._audit import has_table, open_readonly

    now = time.time()
    with open_readonly(path) as conn:
        if not has_table(conn, "accord_branches"):
            return []
        return [_pending(b, now) for b in in_doubt(conn, now)]


async def pending_branches(db: Path | str) -> list[PendingBranch]:
    """Every branch held prepared in the participant database ``db`` (a SQLite path or
    a PostgreSQL URL), oldest first, read without the participant (which may be running
    or dead). :class:`BackendStartError` or ``FileNotFoundError`` when it cannot be read."""
    if is_postgres_url(db):
        from accord.participants._pg import postgres_pending

        return await postgres_pending(str(db))
    return sqlite_pending(db)
