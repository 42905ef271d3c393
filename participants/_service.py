"""The transport-neutral service layer: validates a call, runs it through the barrier on
the store's writer thread, logs one line per event. The gRPC servicer and the in-doubt
resolver both call :meth:`ParticipantService.call`, so a resolved outcome goes through
exactly the same path (barrier included) as a coordinator's Commit or Abort."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable

from accord.participants._app import Participant, ParticipantApp, as_participant
from accord.participants._barrier import (
    Barrier,
    BranchRecord,
    branch_counts,
    create_schema,
    in_doubt,
)
from accord.participants._store import Store
from accord.participants._types import BranchCall, Op, Result, Status

log = logging.getLogger("accord.participant")


class ParticipantService:
    """One participant: its business logic, its store and its barrier."""

    def __init__(
        self,
        logic: Participant | ParticipantApp,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.participant = as_participant(logic)
        self.store = store
        self.clock = clock
        self._barrier = Barrier(self.participant, clock=clock, cache=store.cache)

    @property
    def service(self) -> str:
        return self.participant.service

    async def open(self) -> None:
        """Opens the store, creating the SDK's tables and the participant's."""
        participant = self.participant

        def setup(conn: sqlite3.Connection) -> None:
            create_schema(conn)
            participant.setup(conn)

        await self.store.open(setup)

    async def close(self) -> None:
        await self.store.close()

    async def call(self, op: Op, call: BranchCall, *, fence: bool = True) -> Result:
        """Runs one participant call; returns once its effect (and barrier row) is
        durable. Raises only for internal errors (the caller answers INTERNAL)."""
        invalid = _validate(call)
        if invalid is not None:
            return Result(Status.INVALID, invalid)
        barrier = self._barrier
        result = await self.store.write(lambda conn: barrier.run(conn, op, call, fence=fence))
        _log_result(op, call, result, resolver=not fence)
        return result

    async def in_doubt(self, older_than_s: float) -> list[BranchRecord]:
        """Branches held prepared for longer than ``older_than_s`` seconds."""
        before = self.clock() - older_than_s
        return await self.store.read(lambda conn: in_doubt(conn, before))

    async def branch_counts(self) -> dict[str, int]:
        return await self.store.read(branch_counts)


def _validate(call: BranchCall) -> str | None:
    if not call.gid:
        return "gid must not be empty"
    if not call.branch_id:
        return "branch_id must not be empty"
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
