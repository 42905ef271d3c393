"""Barrier semantics (DESIGN guarantee 5) and fencing (guarantee 7), through the
transport-neutral service on a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from accord.participants import (
    BranchCall,
    NotYet,
    Op,
    Participant,
    ParticipantService,
    Refuse,
    Status,
    Store,
    Vote,
)


class Counting(Participant):
    """Records every handler run (in memory and, inside the local transaction, in a
    table) and behaves according to the operation name."""

    service = "counting"

    def __init__(self) -> None:
        self.runs: list[tuple[str, str, str]] = []

    def setup(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS effects (gid TEXT, branch_id TEXT, phase TEXT)")

    def _effect(self, conn: sqlite3.Connection, call: BranchCall, phase: str) -> None:
        self.runs.append((phase, call.gid, call.branch_id))
        conn.execute("INSERT INTO effects VALUES (?, ?, ?)", (call.gid, call.branch_id, phase))

    def prepare(self, conn: sqlite3.Connection, call: BranchCall) -> Vote | None:
        self._effect(conn, call, "prepare")
        if call.operation == "no":
            raise Refuse("no thanks")
        if call.operation == "later":
            raise NotYet("not ready")
        if call.operation == "boom":
            raise RuntimeError("boom")
        if call.operation == "read":
            return Vote.READ_ONLY
        return None

    def commit(self, conn: sqlite3.Connection, call: BranchCall) -> None:
        self._effect(conn, call, "commit")

    def abort(self, conn: sqlite3.Connection, call: BranchCall) -> None:
        self._effect(conn, call, "abort")


def bc(gid: str = "g1", branch: str = "b1", operation: str = "ok", **kw: Any) -> BranchCall:
    return BranchCall(gid=gid, branch_id=branch, operation=operation, **kw)


@pytest.fixture
def logic() -> Counting:
    return Counting()


@pytest.fixture
async def svc(tmp_path: Path, logic: Counting) -> AsyncIterator[ParticipantService]:
    service = ParticipantService(logic, Store(tmp_path / "p.db"))
    await service.open()
    yield service
    await service.close()


async def effects(svc: ParticipantService) -> list[tuple[str, str, str]]:
    return await svc.store.read(
        lambda c: c.execute("SELECT gid, branch_id, phase FROM effects ORDER BY rowid").fetchall()
    )


async def branch_state(svc: ParticipantService, gid: str = "g1", branch: str = "b1") -> str | None:
    def q(c: sqlite3.Connection) -> str | None:
        row = c.execute(
            "SELECT state FROM accord_branches WHERE gid = ? AND branch_id = ?", (gid, branch)
        ).fetchone()
        return None if row is None else str(row[0])

    return await svc.store.read(q)


async def test_prepare_commit_duplicates_run_handlers_once(
    svc: ParticipantService, logic: Counting
) -> None:
    for _ in range(3):
        r = await svc.call(Op.PREPARE, bc())
        assert r.status is Status.OK and r.message == "prepared"
    assert await branch_state(svc) == "PREPARED"
    for _ in range(3):
        r = await svc.call(Op.COMMIT, bc())
        assert r.status is Status.OK and r.message == "committed"
    assert logic.runs == [("prepare", "g1", "b1"), ("commit", "g1", "b1")]
    assert await effects(svc) == [("g1", "b1", "prepare"), ("g1", "b1", "commit")]
    assert await branch_state(svc) == "COMMITTED"


async def test_concurrent_duplicates_run_once(svc: ParticipantService, logic: Counting) -> None:
    results = await asyncio.gather(*(svc.call(Op.PREPARE, bc()) for _ in range(20)))
    assert {r.status for r in results} == {Status.OK}
    results = await asyncio.gather(*(svc.call(Op.ABORT, bc()) for _ in range(20)))
    assert {r.message for r in results} == {"aborted"}
    assert logic.runs == [("prepare", "g1", "b1"), ("abort", "g1", "b1")]


async def test_abort_before_prepare_is_noop_and_refuses_late_prepare(
    svc: ParticipantService, logic: Counting
) -> None:
    r = await svc.call(Op.ABORT, bc())
    assert r.status is Status.OK and "before prepare" in r.message
    assert await branch_state(svc) == "ABORTED"
    late = await svc.call(Op.PREPARE, bc())
    assert late.status is Status.REFUSED and "already aborted" in late.message
    assert (await svc.call(Op.ABORT, bc())).status is Status.OK  # duplicate abort
    assert logic.runs == []  # no handler ever ran: nothing held, nothing hanging
    assert await svc.branch_counts() == {
        "PREPARED": 0,
        "READ_ONLY": 0,
        "COMMITTED": 0,
        "ABORTED": 1,
    }


async def test_refused_prepare_is_recorded_and_rolled_back(
    svc: ParticipantService, logic: Counting
) -> None:
    for _ in range(2):
        r = await svc.call(Op.PREPARE, bc(operation="no"))
        assert r.status is Status.REFUSED and r.message == "no thanks"
    assert logic.runs == [("prepare", "g1", "b1")]  # the duplicate did not run it again
    assert await effects(svc) == []  # the handler's own write was undone
    r = await svc.call(Op.ABORT, bc(operation="no"))
    assert r.status is Status.OK and r.message.startswith("no-op")
    assert [run[0] for run in logic.runs] == ["prepare"]  # no abort handler for a no vote
    r = await svc.call(Op.COMMIT, bc(operation="no"))
    assert r.status is Status.CONFLICT


async def test_not_yet_is_not_recorded(svc: ParticipantService, logic: Counting) -> None:
    for _ in range(2):
        r = await svc.call(Op.PREPARE, bc(operation="later"))
        assert r.status is Status.NOT_YET and r.message == "not ready"
    assert len(logic.runs) == 2  # retried for real
    assert await effects(svc) == []
    assert await branch_state(svc) is None


async def test_handler_exception_rolls_back_only_its_own_call(
    svc: ParticipantService, logic: Counting
) -> None:
    results = await asyncio.gather(
        svc.call(Op.PREPARE, bc("g1")),
        svc.call(Op.PREPARE, bc("g2", operation="boom")),
        svc.call(Op.PREPARE, bc("g3")),
        return_exceptions=True,
    )
    assert isinstance(results[1], RuntimeError)
    assert [r.status for r in results if not isinstance(r, BaseException)] == [Status.OK] * 2
    assert sorted(g for g, _, _ in await effects(svc)) == ["g1", "g3"]
    assert await branch_state(svc, "g2") is None


async def test_read_only_vote_leaves_phase_two(svc: ParticipantService, logic: Counting) -> None:
    r = await svc.call(Op.PREPARE, bc(operation="read"))
    assert r.status is Status.OK and r.read_only
    assert await branch_state(svc) == "READ_ONLY"
    assert (await svc.call(Op.COMMIT, bc(operation="read"))).status is Status.OK
    assert (await svc.call(Op.ABORT, bc(operation="read", branch="b1"))).status is Status.OK
    assert [run[0] for run in logic.runs] == ["prepare"]


async def test_commit_without_prepare_is_refused(svc: ParticipantService, logic: Counting) -> None:
    r = await svc.call(Op.COMMIT, bc())
    assert r.status is Status.CONFLICT and "without a prepare" in r.message
    assert logic.runs == []
    # Not recorded: nothing happened, so a later prepare is still possible.
    assert (await svc.call(Op.PREPARE, bc())).status is Status.OK


async def test_commit_after_abort_and_abort_after_commit_are_refused(
    svc: ParticipantService,
) -> None:
    await svc.call(Op.PREPARE, bc("ga"))
    await svc.call(Op.ABORT, bc("ga"))
    r = await svc.call(Op.COMMIT, bc("ga"))
    assert r.status is Status.CONFLICT and "already aborted" in r.message
    await svc.call(Op.PREPARE, bc("gc"))
    await svc.call(Op.COMMIT, bc("gc"))
    r = await svc.call(Op.ABORT, bc("gc"))
    assert r.status is Status.CONFLICT and "already committed" in r.message
    assert await branch_state(svc, "ga") == "ABORTED"
    assert await branch_state(svc, "gc") == "COMMITTED"


async def test_one_phase_commit(svc: ParticipantService, logic: Counting) -> None:
    for _ in range(2):
        r = await svc.call(Op.COMMIT, bc(one_phase=True))
        assert r.status is Status.OK and "one phase" in r.message
    assert logic.runs == [("prepare", "g1", "b1"), ("commit", "g1", "b1")]
    assert await branch_state(svc) == "COMMITTED"
    # A late two-phase Prepare of the same branch gets the recorded yes, nothing re-runs.
    assert (await svc.call(Op.PREPARE, bc())).status is Status.OK
    assert len(logic.runs) == 2


async def test_one_phase_refusal_is_the_outcome(svc: ParticipantService, logic: Counting) -> None:
    for _ in range(2):
        r = await svc.call(Op.COMMIT, bc(operation="no", one_phase=True))
        assert r.status is Status.REFUSED and r.message == "no thanks"
    assert len(logic.runs) == 1
    assert await effects(svc) == []
    assert await branch_state(svc) == "ABORTED"


async def test_one_phase_after_abort_is_refused(svc: ParticipantService, logic: Counting) -> None:
    await svc.call(Op.ABORT, bc())
    r = await svc.call(Op.COMMIT, bc(one_phase=True))
    assert r.status is Status.REFUSED and "aborted" in r.message
    assert logic.runs == []


async def test_phase_two_uses_the_prepared_payload(svc: ParticipantService) -> None:
    seen: list[bytes] = []

    class Spy(Counting):
        def commit(self, conn: sqlite3.Connection, call: BranchCall) -> None:
            seen.append(call.payload)

    spy = ParticipantService(Spy(), svc.store)
    await spy.call(Op.PREPARE, bc(payload=b'{"x": 1}'))
    await spy.call(Op.COMMIT, bc(operation="", payload=b""))
    assert seen == [b'{"x": 1}']


async def test_phase_two_with_the_prepared_payload_or_another(svc: ParticipantService) -> None:
    # The usual call carries what was prepared (one UPDATE); a call carrying something
    # else still finishes the branch, with the handler given the prepared payload.
    seen: list[tuple[str, str, bytes]] = []

    class Spy(Counting):
        def commit(self, conn: sqlite3.Connection, call: BranchCall) -> None:
            seen.append(("commit", call.operation, call.payload))

        def abort(self, conn: sqlite3.Connection, call: BranchCall) -> None:
            seen.append(("abort", call.operation, call.payload))

    spy = ParticipantService(Spy(), svc.store)
    await spy.call(Op.PREPARE, bc("g1", payload=b"p1"))
    await spy.call(Op.PREPARE, bc("g2", payload=b"p2"))
    assert (await spy.call(Op.COMMIT, bc("g1", payload=b"p1"))).message == "committed"
    assert (await spy.call(Op.ABORT, bc("g2", operation="other", payload=b"x"))).ok
    assert seen == [("commit", "ok", b"p1"), ("abort", "ok", b"p2")]
    # Retries are answered from the barrier, whatever they carry.
    assert (await spy.call(Op.COMMIT, bc("g1", payload=b"x"))).duplicate
    assert (await spy.call(Op.ABORT, bc("g2", payload=b"p2"))).duplicate
    assert len(seen) == 2


async def test_validation(svc: ParticipantService, logic: Counting) -> None:
    for op in Op:
        assert (await svc.call(op, bc(gid=""))).status is Status.INVALID
        assert (await svc.call(op, bc(branch=""))).status is Status.INVALID
    assert logic.runs == []


async def test_saga_ops_default_to_unknown_operation(
    svc: ParticipantService, logic: Counting
) -> None:
    # A 2PC-only participant (no execute/compensate override): Execute is a business no.
    r = await svc.call(Op.EXECUTE, bc())
    assert r.status is Status.REFUSED and "unknown operation 'ok'" in r.message
    # Its compensation is a recorded no-op (the action never ran), not a handler call.
    assert (await svc.call(Op.COMPENSATE, bc(operation="undo"))).ok
    assert logic.runs == []


async def fence_epoch(svc: ParticipantService, shard: str) -> int | None:
    def q(c: sqlite3.Connection) -> int | None:
        row = c.execute("SELECT epoch FROM accord_fence WHERE shard = ?", (shard,)).fetchone()
        return None if row is None else int(row[0])

    return await svc.store.read(q)


async def test_fencing(svc: ParticipantService, logic: Counting) -> None:
    assert (await svc.call(Op.PREPARE, bc("g1", shard="s1", epoch=5))).ok
    assert await fence_epoch(svc, "s1") == 5
    r = await svc.call(Op.PREPARE, bc("g2", shard="s1", epoch=4))
    assert r.status is Status.FENCED and r.message == "fenced: epoch 4 < 5 for shard 's1'"
    # Duplicates from a deposed coordinator are fenced too.
    assert (await svc.call(Op.COMMIT, bc("g1", shard="s1", epoch=4))).status is Status.FENCED
    assert (await svc.call(Op.COMMIT, bc("g1", shard="s1", epoch=7))).ok
    assert await fence_epoch(svc, "s1") == 7
    assert (await svc.call(Op.PREPARE, bc("g3", shard="s1", epoch=5))).status is Status.FENCED
    # Shards are independent; epoch 0 / empty shard mean no fencing.
    assert (await svc.call(Op.PREPARE, bc("g4", shard="s2", epoch=1))).ok
    assert (await svc.call(Op.PREPARE, bc("g5", shard="s1", epoch=0))).ok
    assert (await svc.call(Op.PREPARE, bc("g6"))).ok
    assert await fence_epoch(svc, "s1") == 7
    assert [run[1] for run in logic.runs] == ["g1", "g1", "g4", "g5", "g6"]


async def test_raised_epoch_is_kept_when_the_vote_is_no_or_not_yet(
    svc: ParticipantService,
) -> None:
    r = await svc.call(Op.PREPARE, bc("g1", operation="no", shard="s", epoch=3))
    assert r.status is Status.REFUSED
    assert await fence_epoch(svc, "s") == 3
    r = await svc.call(Op.PREPARE, bc("g2", operation="later", shard="s", epoch=4))
    assert r.status is Status.NOT_YET
    assert await fence_epoch(svc, "s") == 4


async def test_prepared_branch_survives_reopen(tmp_path: Path, logic: Counting) -> None:
    first = ParticipantService(logic, Store(tmp_path / "p.db"))
    await first.open()
    call = bc(payload=b"data", coordinator_address="127.0.0.1:1", shard="s", epoch=2)
    await first.call(Op.PREPARE, call)
    await first.close()

    second = ParticipantService(logic, Store(tmp_path / "p.db"))
    await second.open()
    try:
        [branch] = await second.in_doubt(0.0)
        assert (branch.gid, branch.branch_id, branch.state) == ("g1", "b1", "PREPARED")
        assert (branch.payload, branch.coordinator_address) == (b"data", "127.0.0.1:1")
        assert (branch.shard, branch.epoch) == ("s", 2)
        assert (await second.call(Op.PREPARE, call)).message == "prepared"  # recorded
        assert (await second.call(Op.COMMIT, call)).message == "committed"
        assert await second.in_doubt(0.0) == []
    finally:
        await second.close()
    assert [run[0] for run in logic.runs] == ["prepare", "commit"]


async def test_commit_not_yet_keeps_the_branch_prepared(tmp_path: Path) -> None:
    class Slow(Counting):
        ready = False

        def commit(self, conn: sqlite3.Connection, call: BranchCall) -> None:
            self._effect(conn, call, "commit")
            if not self.ready:
                raise NotYet("commit later")

    logic = Slow()
    svc = ParticipantService(logic, Store(tmp_path / "p.db"))
    await svc.open()
    try:
        assert (await svc.call(Op.PREPARE, bc())).message == "prepared"
        r = await svc.call(Op.COMMIT, bc())
        assert r.status is Status.NOT_YET
        assert await branch_state(svc) == "PREPARED"  # the state change was undone too
        assert await effects(svc) == [("g1", "b1", "prepare")]
        logic.ready = True
        assert (await svc.call(Op.COMMIT, bc())).message == "committed"
        assert await branch_state(svc) == "COMMITTED"
        assert (await svc.call(Op.ABORT, bc())).status is Status.CONFLICT
    finally:
        await svc.close()


async def test_fence_raised_by_another_writer_is_honoured(svc: ParticipantService) -> None:
    # The barrier keeps fence epochs in memory; the database stays the truth.
    assert (await svc.call(Op.PREPARE, bc("g1", shard="s", epoch=2))).ok
    other = sqlite3.connect(svc.store.path, isolation_level=None)
    try:
        other.execute("UPDATE accord_fence SET epoch = 9 WHERE shard = 's'")
    finally:
        other.close()
    assert (await svc.call(Op.PREPARE, bc("g2", shard="s", epoch=5))).status is Status.FENCED
    assert (await svc.call(Op.PREPARE, bc("g3", shard="s", epoch=9))).ok


async def test_fence_is_shared_by_services_on_one_store(
    svc: ParticipantService, logic: Counting
) -> None:
    second = ParticipantService(logic, svc.store)
    assert (await svc.call(Op.PREPARE, bc("g1", shard="s", epoch=2))).ok
    assert (await second.call(Op.PREPARE, bc("g2", shard="s", epoch=6))).ok
    assert (await svc.call(Op.PREPARE, bc("g3", shard="s", epoch=3))).status is Status.FENCED
