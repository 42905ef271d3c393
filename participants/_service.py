"""The transport-neutral service layer: validates a call, runs it through the backend
(:mod:`accord.participants._backend`: the barrier on the SQLite store's writer thread, or
a PostgreSQL transaction), logs one line per event. The gRPC servicer and the in-doubt
resolver both call :meth:`ParticipantService.call`, so a resolved outcome goes through
exactly the same path (barrier included) as a coordinator's Commit or Abort."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from accord.participants._app import Participant, ParticipantApp, as_participant
from accord.participants._backend import Backend, PendingBranch, SqliteBackend
from accord.participants._barrier import BranchRecord
from accord.participants._store import Store
from accord.participants._types import BranchCall, Op, Result, Status

log = logging.getLogger("accord.participant")


class ParticipantService:
    """One participant: its business logic and its database (a SQLite :class:`Store`,
    or any :class:`Backend`)."""

    def __init__(
        self,
        logic: Participant | ParticipantApp,
        store: Store | Backend,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.participant = as_participant(logic)
        self.clock = clock
        if isinstance(store, Store):
            store = SqliteBackend(store, clock=clock)
        if isinstance(store, SqliteBackend):
            store.bind(self.participant)
        self.backend: Backend = store
        self._call = store.call
        # SQLite's hot path as before the Backend seam: straight to the store's writer
        # (no extra coroutine per call).
        self._sqlite = (store.store, store.barrier) if isinstance(store, SqliteBackend) else None

    @property
    def store(self) -> Store:
        """The SQLite store (SQLite participants only)."""
        if not isinstance(self.backend, SqliteBackend):
            raise TypeError(f"participant {self.service!r} keeps its data in {self.backend.kind}")
        return self.backend.store

    @property
    def service(self) -> str:
        return self.participant.service

    async def open(self) -> None:
        """Opens the database, creating the SDK's tables and the participant's."""
        await self.backend.start(self.participant)

    async def close(self) -> None:
        await self.backend.stop()

    async def call(self, op: Op, call: BranchCall, *, fence: bool = True) -> Result:
        """Runs one participant call; returns once its effect (and barrier row) is
        durable. Raises only for internal errors (the caller answers INTERNAL)."""
        invalid = _validate(call)
        if invalid is not None:
            return Result(Status.INVALID, invalid)
        if self._sqlite is not None:
            store, barrier = self._sqlite
            result = await store.write(lambda conn: barrier.run(conn, op, call, fence=fence))
        else:
            result = await self._call(op, call, fence=fence)
        _log_result(op, call, result, resolver=not fence)
        return result

    async def in_doubt(self, older_than_s: float) -> list[BranchRecord]:
        """Branches held prepared for longer than ``older_than_s`` seconds."""
        return await self.backend.in_doubt(older_than_s)

    async def branch_counts(self) -> dict[str, int]:
        return await self.backend.branch_counts()

    async def pending(self) -> list[PendingBranch]:
        """Every branch held prepared now, oldest first."""
        return await self.backend.pending()


#: The fencing epoch is kept in a signed 64-bit column (SQLite INTEGER, PostgreSQL
#: BIGINT); the proto field is uint64. (Found by tests/integration/test_fuzz.py: a
#: larger one was an INTERNAL error with a traceback.)
_MAX_EPOCH = 2**63 - 1


def _validate(call: BranchCall) -> str | None:
    if not call.gid:
        return "gid must not be empty"
    if not call.branch_id:
        return "branch_id must not be empty"
    if call.epoch > _MAX_EPOCH:
        return f"epoch {call.epoch} is over {_MAX_EPOCH}"
    return None


def _log_result(op: Op, call: BranchCall, result: Result, *, resolver: bool) -> None:
    if result.status is Status.OK:
        level = logging.INFO if resolver else logging.DEBUG
    elif result.status is Status.REFUSED:
        level = logging.INFO
    else:
        level = logging.WARNING
    if not log.isEnabledFor(level):
        return
    log.log(
        level,
        "event=%s gid=%s branch=%s operation=%s status=%s message=%r%s%s",
        op.value,
        call.gid,
        call.branch_id,
        call.operation,
        result.status.value,
        result.message,
        f" traceparent={call.traceparent}" if call.traceparent else "",
        " source=resolver" if resolver else "",
    )
