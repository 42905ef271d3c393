"""The two ways to write a participant's business logic.

Subclass style: subclass :class:`Participant` and override ``setup``, ``prepare``,
``commit`` and ``abort`` (each one dispatches on ``call.operation`` itself).

Decorator style: register one function per operation and phase on a
:class:`ParticipantApp`; the app turns itself into a :class:`Participant`.

Either way, handlers are plain synchronous functions. They run on the SDK's writer
thread, inside the local transaction (a SAVEPOINT) that also records the barrier row, so
they must only touch the connection they are given: no network calls, no sleeping, no
other database. Raising rolls back the handler's changes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from typing import TypeVar

from participants._types import BranchCall, Refuse, Vote

#: A prepare handler: returns its vote (``None`` means yes), or raises
#: :class:`~participants.Refuse` (no) or :class:`~participants.NotYet` (retry later).
PrepareHandler = Callable[[sqlite3.Connection, BranchCall], Vote | None]
#: A commit or abort handler. It must not refuse: a yes vote is a promise.
PhaseHandler = Callable[[sqlite3.Connection, BranchCall], None]
SetupHandler = Callable[[sqlite3.Connection], None]

_P = TypeVar("_P", bound=PrepareHandler)
_H = TypeVar("_H", bound=PhaseHandler)
_S = TypeVar("_S", bound=SetupHandler)


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


class ParticipantApp:
    """Business logic registered per operation (decorator style)::

        app = ParticipantApp("bank")

        @app.prepare("debit")
        def reserve(conn: sqlite3.Connection, call: BranchCall) -> Vote | None: ...

    An operation needs a prepare handler; its commit and abort handlers default to doing
    nothing. Prepare of an operation with no handler is refused (ABORTED).
    """

    def __init__(self, service: str) -> None:
        self.service = service
        self._prepare: dict[str, PrepareHandler] = {}
        self._commit: dict[str, PhaseHandler] = {}
        self._abort: dict[str, PhaseHandler] = {}
        self._setup: list[SetupHandler] = []

    @property
    def operations(self) -> tuple[str, ...]:
        return tuple(sorted(self._prepare))

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

    def setup(self, conn: sqlite3.Connection) -> None:
        for fn in self._app._setup:
            fn(conn)

    def prepare(self, conn: sqlite3.Connection, call: BranchCall) -> Vote | None:
        handler = self._app._prepare.get(call.operation)
        if handler is None:
            known = ", ".join(self._app.operations) or "none"
            raise Refuse(f"unknown operation {call.operation!r} (known: {known})")
        return handler(conn, call)

    def commit(self, conn: sqlite3.Connection, call: BranchCall) -> None:
        handler = self._app._commit.get(call.operation)
        if handler is not None:
            handler(conn, call)

    def abort(self, conn: sqlite3.Connection, call: BranchCall) -> None:
        handler = self._app._abort.get(call.operation)
        if handler is not None:
            handler(conn, call)


def as_participant(logic: Participant | ParticipantApp) -> Participant:
    return logic.as_participant() if isinstance(logic, ParticipantApp) else logic
