"""The participant SDK: implement ``accord.v1.Participant`` by writing business logic only.

What it owns: the barrier (exactly-once effects; an abort before its prepare or a
compensation before its action is a recorded no-op that refuses the late call), the
branch table (prepared branches survive a crash), fencing (lower coordinator epochs
refused), the database behind them (:mod:`~accord.participants._backend`: group commit
on SQLite, WAL and ``synchronous=FULL``, the default; or PostgreSQL for a
``postgresql://`` URL, where a 2PC branch is a ``PREPARE TRANSACTION`` and handlers are
``async def`` on a psycopg connection, see :mod:`~accord.participants._pg`), the in-doubt resolver
(presumed abort: ask the coordinator about branches held prepared too long) and the
gRPC server (health checking and reflection on), and a durable audit of every branch
call (``accord_audit``, read offline with :func:`read_audit`). What it must not touch: the
coordinator's state, the registry's internals.

Two ways to write a participant::

    app = ParticipantApp("inventory")

    @app.prepare("reserve")
    def reserve(conn: sqlite3.Connection, call: BranchCall) -> Vote | None:
        ...  # check; hold; raise Refuse("out of stock") for a no vote

    @app.execute("ship")          # a saga step: optional result bytes, or Refuse/NotYet
    def ship(conn: sqlite3.Connection, call: BranchCall) -> bytes | None: ...

    @app.compensate("unship")     # keyed by the compensation's name; may raise NotYet
    def unship(conn: sqlite3.Connection, call: BranchCall) -> None: ...

    class Inventory(Participant):
        def prepare(self, conn: sqlite3.Connection, call: BranchCall) -> Vote | None: ...
        def execute(self, conn: sqlite3.Connection, call: BranchCall) -> bytes | None: ...
        def compensate(self, conn: sqlite3.Connection, call: BranchCall) -> None: ...

and serve either with ``async with ParticipantServer(app, db=path) as srv`` or
``await serve(app, db=path, listen="127.0.0.1:7101")``.

PostgreSQL instead of SQLite: ``db="postgresql://user@host/dbname"`` (the server needs
``max_prepared_transactions`` > 0), and handlers ``async def`` on a
``psycopg.AsyncConnection``; a 2PC branch is then a real prepared transaction
(``PREPARE TRANSACTION``, finished by ``COMMIT PREPARED`` / ``ROLLBACK PREPARED`` from
any instance of the service). See :mod:`accord.participants._pg`.

The example participants live in subpackages (``accord.participants.bank``,
``accord.participants.trip``).
"""

from typing import TYPE_CHECKING

from accord.participants._app import (
    CompensateHandler,
    ExecuteHandler,
    Participant,
    ParticipantApp,
    PhaseHandler,
    PrepareHandler,
    SetupHandler,
)
from accord.participants._audit import AuditRow, copy_database, read_audit
from accord.participants._backend import (
    Backend,
    BackendStartError,
    PendingBranch,
    SqliteBackend,
    is_postgres_url,
    open_backend,
    pending_branches,
)
from accord.participants._barrier import (
    OP_ONE_PHASE_COMMIT,
    SOURCE_COORDINATOR,
    SOURCE_RESOLVER,
    BranchRecord,
    BranchState,
    Outcome,
)
from accord.participants._resolver import InDoubtResolver
from accord.participants._server import (
    PARTICIPANT_SERVICE_NAME,
    Announce,
    ParticipantServer,
    ServiceInstaller,
    serve,
)
from accord.participants._service import ParticipantService
from accord.participants._servicer import ParticipantServicer
from accord.participants._store import Store, StoreError, StoreStats
from accord.participants._types import BranchCall, NotYet, Op, Refuse, Result, Status, Vote

__all__ = [
    "OP_ONE_PHASE_COMMIT",
    "PARTICIPANT_SERVICE_NAME",
    "SOURCE_COORDINATOR",
    "SOURCE_RESOLVER",
    "Announce",
    "AuditRow",
    "Backend",
    "BackendStartError",
    "BranchCall",
    "BranchRecord",
    "BranchState",
    "CompensateHandler",
    "ExecuteHandler",
    "InDoubtResolver",
    "NotYet",
    "Op",
    "Outcome",
    "Participant",
    "ParticipantApp",
    "ParticipantServer",
    "ParticipantService",
    "ParticipantServicer",
    "PendingBranch",
    "PhaseHandler",
    "PostgresBackend",
    "PrepareHandler",
    "Refuse",
    "Result",
    "ServiceInstaller",
    "SetupHandler",
    "SqliteBackend",
    "Status",
    "Store",
    "StoreError",
    "StoreStats",
    "Vote",
    "copy_database",
    "is_postgres_url",
    "open_backend",
    "pending_branches",
    "read_audit",
    "serve",
]

if TYPE_CHECKING:
    from accord.participants._pg import PostgresBackend


def __getattr__(name: str) -> object:
    # PostgreSQL support is imported on first use: psycopg costs SQLite participants
    # (and every command that imports this package) nothing.
    if name == "PostgresBackend":
        from accord.participants._pg import PostgresBackend

        return PostgresBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
