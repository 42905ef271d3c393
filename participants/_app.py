"""The two ways to write a participant's business logic.

Subclass style: subclass :class:`Participant` and override ``setup``, ``prepare``,
``commit`` and ``abort`` (2PC) and ``execute`` and ``compensate`` (sagas); each one
dispatches on ``call.operation`` itself.

Decorator style: register one function per operation and phase on a
:class:`ParticipantApp`; the app turns itself into a :class:`Participant`.

Saga handlers are keyed differently from 2PC ones: Execute carries the step's action
name, Compensate the compensation's own name (``branch_id`` is the step's name either
way). 2PC and saga operations are dispatched separately, so a name may be used by both.

On SQLite (the default), handlers are plain synchronous functions. They run on the SDK's
writer thread, inside the local transaction (a SAVEPOINT) that also records the barrier
row, so they must only touch the connection they are given: no network calls, no
sleeping, no other database. Raising rolls back the handler's changes.

On PostgreSQL (``db="postgresql://..."``), handlers are ``async def`` on a
``psycopg.AsyncConnection``, inside the branch's PostgreSQL transaction (which a 2PC
Prepare ends with ``PREPARE TRANSACTION``): the prepare handler does the work and the
database's row locks hold it until COMMIT PREPARED or ROLLBACK PREPARED; commit and abort
handlers are optional (they run once, in the local transaction that records the
outcome). See :mod:`accord.participants._pg`.
"""

from __future__ import annotations

import inspect
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from accord.participants._types import BranchCall, NotYet, Refuse, Vote

#: A prepare handler: returns its vote (``None`` means yes), or raises
#: :class:`~accord.participants.Refuse` (no) or :class:`~accord.participants.NotYet` (retry later).
PrepareHandler = Callable[[sqlite3.Connection, BranchCall], Vote | None]
#: A commit or abort handler. It must not refuse: a yes vote is a promise.
PhaseHandler = Callable[[sqlite3.Connection, BranchCall], None]
SetupHandler = Callable[[sqlite3.Connection], None]
#: A saga action: applies the step and returns optional result bytes for the coordinator
#: (``BranchResponse.result``), or raises :class:`~accord.participants.Refuse` (the step failed
#: for good, nothing changed) or :class:`~accord.participants.NotYet` (retry later).
ExecuteHandler = Callable[[sqlite3.Connection, BranchCall], bytes | None]
#: A saga compensation: undoes an executed step. It may raise ``NotYet`` (retry later);
#: it must not refuse (a refusal is answered FAILED_PRECONDITION and logged).
CompensateHandler = Callable[[sqlite3.Connection, BranchCall], None]


if TYPE_CHECKING:
    import psycopg

# The PostgreSQL handlers: the same, ``async def`` on a psycopg connection (psycopg is
# imported only by a participant that uses PostgreSQL).
PgPrepareHandler = Callable[["psycopg.AsyncConnection[Any]", BranchCall], Awaitable[Vote | None]]
PgPhaseHandler = Callable[["psycopg.AsyncConnection[Any]", BranchCall], Awaitable[None]]
PgSetupHandler = Callable[["psycopg.AsyncConnection[Any]"], Awaitable[None]]
PgExecuteHandler = Callable[["psycopg.AsyncConnection[Any]", BranchCall], Awaitable[bytes | None]]
PgCompensateHandler = Callable[["psycopg.AsyncConnection[Any]", BranchCall], Awaitable[None]]

_P = TypeVar("_P", bound=PrepareHandler | PgPrepareHandler)
_H = TypeVar("_H", bound=PhaseHandler | PgPhaseHandler)
_S = TypeVar("_S", bound=SetupHandler | PgSetupHandler)
_E = TypeVar("_E", bound=ExecuteHandler | PgExecuteHandler)
_C = TypeVar("_C", bound=CompensateHandler | PgCompensateHandler)


class Participant:
    """Base class of a participant's business logic (subclass style)."""

    #: The service name (logs, health status).
    service: str = "participant"
    #: The operations it serves (advertised in the registry; informational).
    operations: tuple[str, ...] = ()

    def setup(self, conn: sqlite3.Connection) -> None:
        """Creates the business tables (``CREATE TABLE IF NOT EXISTS ...``); runs once
        at start-up, in its own transaction."""

    def prepare(self, conn: sqlite3.Connection, call: BranchCall) -> Vote | None:
        """Phase one: check and reserve; return the vote or raise ``Refuse``."""
        raise Refuse(f"unknown operation {call.operation!r}")

    def commit(self, conn: sqlite3.Connection, call: BranchCall) -> None:
        """Phase two after a yes vote: apply what was reserved."""

    def abort(self, conn: sqlite3.Connection, call: BranchCall) -> None:
        """Phase two after a yes vote: release what was reserved. Never called for a
        branch that was not prepared (the barrier turns that into a recorded no-op)."""

    def execute(self, conn: sqlite3.Connection, call: BranchCall) -> bytes | None:
        """A saga step's action: apply it and return optional result bytes, or raise
        ``Refuse`` (the step failed for good) or ``NotYet`` (retry later). Runs at most
        once per (gid, step), and never after the step's compensation arrived."""
        raise Refuse(f"unknown operation {call.operation!r}")

    def compensate(self, conn: sqlite3.Connection, call: BranchCall) -> None:
        """A saga step's compensation (``call.operation`` is the compensation's name):
        undo what ``execute`` did. Runs at most once, and only after a successful
        ``execute`` of the same (gid, step); may raise ``NotYet``, must not refuse."""
        raise NotYet(f"no compensation handler for {call.operation!r}")


class ParticipantApp:
    """Business logic registered per operation (decorator style)::

        app = ParticipantApp("bank")

        @app.prepare("debit")
        def reserve(conn: sqlite3.Connection, call: BranchCall) -> Vote | None: ...

        @app.execute("book")
        def book(conn: sqlite3.Connection, call: BranchCall) -> bytes | None: ...

        @app.compensate("cancel")
        def cancel(conn: sqlite3.Connection, call: BranchCall) -> None: ...

    A 2PC operation needs a prepare handler; its commit and abort handlers default to
    doing nothing. Prepare or Execute of an operation with no handler is refused
    (ABORTED); Compensate with no handler answers "not yet" (FAILED_PRECONDITION: the
    coordinator retries, and the saga ends STUCK where an operator sees it).

    ``db`` (optional) is the database the app is served on when the server is given
    none: a SQLite path, or a ``postgresql://`` URL (then handlers are ``async def`` on a
    psycopg connection)::

        app = ParticipantApp("orders", db="postgresql://app@db-host/orders")
    """

    def __init__(self, service: str, *, db: str | None = None) -> None:
        self.service = service
        self.db = db
        # Handlers of either backend (the backend awaits what an async one returns).
        self._prepare: dict[str, Any] = {}
        self._commit: dict[str, Any] = {}
        self._abort: dict[str, Any] = {}
        self._execute: dict[str, Any] = {}
        self._compensate: dict[str, Any] = {}
        self._setup: list[Any] = []

    @property
    def operations(self) -> tuple[str, ...]:
        """Every operation name it serves: 2PC ones, saga actions and compensations."""
        return tuple(sorted({*self._prepare, *self._execute, *self._compensate}))

    def setup(self, fn: _S) -> _S:
        """Registers a schema function (decorator); several run in registration order."""
        self._setup.append(fn)
        return fn

    def prepare(self, operation: str) -> Callable[[_P], _P]:
        """Registers the prepare handler of ``operation`` (decorator)."""

        def decorator(fn: _P) -> _P:
            _check_new(self._prepare, operation, "prepare")
            self._prepare[operation] = fn
            return fn

        return decorator

    def commit(self, operation: str) -> Callable[[_H], _H]:
        """Registers the commit handler of ``operation`` (decorator)."""

        def decorator(fn: _H) -> _H:
            _check_new(self._commit, operation, "commit")
            self._commit[operation] = fn
            return fn

        return decorator

    def abort(self, operation: str) -> Callable[[_H], _H]:
        """Registers the abort handler of ``operation`` (decorator)."""

        def decorator(fn: _H) -> _H:
            _check_new(self._abort, operation, "abort")
            self._abort[operation] = fn
            return fn

        return decorator

    def execute(self, operation: str) -> Callable[[_E], _E]:
        """Registers the saga action ``operation`` (decorator)."""

        def decorator(fn: _E) -> _E:
            _check_new(self._execute, operation, "execute")
            self._execute[operation] = fn
            return fn

        return decorator

    def compensate(self, operation: str) -> Callable[[_C], _C]:
        """Registers the saga compensation ``operation`` (decorator), keyed by the
        compensation's own name (the one a saga definition gives as ``compensation``)."""

        def decorator(fn: _C) -> _C:
            _check_new(self._compensate, operation, "compensate")
            self._compensate[operation] = fn
            return fn

        return decorator

    def as_participant(self) -> Participant:
        return _AppParticipant(self)


def _check_new(table: Mapping[str, object], operation: str, phase: str) -> None:
    if not operation:
        raise ValueError("operation name must not be empty")
    if operation in table:
        raise ValueError(f"{phase} handler for {operation!r} registered twice")


class _AppParticipant(Participant):
    def __init__(self, app: ParticipantApp) -> None:
        self.service = app.service
        self.operations = app.operations
        self._app = app

    def setup(self, conn: sqlite3.Connection) -> Any:
        if self._app._setup and _is_async(self._app._setup[0]):
            return self._setup_async(conn)
        for fn in self._app._setup:
            fn(conn)
        return None

    async def _setup_async(self, conn: Any) -> None:
        for fn in self._app._setup:
            await fn(conn)

    def prepare(self, conn: sqlite3.Connection, call: BranchCall) -> Vote | None:
        handler = self._app._prepare.get(call.operation)
        if handler is None:
            raise Refuse(
                f"unknown operation {call.operation!r} (known: {_known(self._app._prepare)})"
            )
        result: Vote | None = handler(conn, call)
        return result

    def commit(self, conn: sqlite3.Connection, call: BranchCall) -> Any:
        # Any: an async (PostgreSQL) handler's coroutine goes back to the backend.
        handler = self._app._commit.get(call.operation)
        return None if handler is None else handler(conn, call)

    def abort(self, conn: sqlite3.Connection, call: BranchCall) -> Any:
        # Any: an async (PostgreSQL) handler's coroutine goes back to the backend.
        handler = self._app._abort.get(call.operation)
        return None if handler is None else handler(conn, call)

    def execute(self, conn: sqlite3.Connection, call: BranchCall) -> bytes | None:
        handler = self._app._execute.get(call.operation)
        if handler is None:
            raise Refuse(
                f"unknown operation {call.operation!r} (known: {_known(self._app._execute)})"
            )
        out: bytes | None = handler(conn, call)
        return out

    def compensate(self, conn: sqlite3.Connection, call: BranchCall) -> Any:
        handler = self._app._compensate.get(call.operation)
        if handler is None:
            known = _known(self._app._compensate)
            raise NotYet(f"no compensation handler for {call.operation!r} (known: {known})")
        return handler(conn, call)


def _is_async(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn)


def _known(table: Mapping[str, object]) -> str:
    return ", ".join(sorted(table)) or "none"


def as_participant(logic: Participant | ParticipantApp) -> Participant:
    return logic.as_participant() if isinstance(logic, ParticipantApp) else logic
