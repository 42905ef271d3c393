"""Barrier semantics (DESIGN guarantee 5) and fencing (guarantee 7) on PostgreSQL, with
2PC branches as real prepared transactions: the SQLite barrier tests' cases
(tests/unit/test_barrier.py) through the transport-neutral service on a real server,
plus what only PostgreSQL has (another instance finishing a branch, PREPARE TRANSACTION
names, lock timeouts)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from accord.participants import (
    BranchCall,
    NotYet,
    Op,
    ParticipantApp,
    ParticipantService,
    Refuse,
    Status,
    Vote,
)
from accord.participants._pg import PostgresBackend, transaction_name

Conn = psycopg.AsyncConnection[Any]


def counting_app(runs: list[tuple[str, str, str]]) -> ParticipantApp:
    """Records every handler run (in memory, and in a table inside the transaction) and
    behaves according to the operation name."""
    app = ParticipantApp("counting")

    @app.setup
    async def schema(conn: Conn) -> None:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS effects"
            " (seq serial, gid text, branch_id text, phase text, value int DEFAULT 0)"
        )
        await conn.execute("CREATE TABLE IF NOT EXISTS hot (id int PRIMARY KEY, n int)")
        await conn.execute("INSERT INTO hot VALUES (1, 0) ON CONFLICT DO NOTHING")

    async def effect(conn: Conn, call: BranchCall, phase: str) -> None:
        runs.append((phase, call.gid, call.branch_id))
        await conn.execute(
            "INSERT INTO effects (gid, branch_id, phase) VALUES (%s, %s, %s)",
            (call.gid, call.branch_id, phase),
        )

    for op in ("ok", "no", "later", "boom", "read", "hot"):

        @app.prepare(op)
        async def prepare(conn: Conn, call: BranchCall) -> Vote | None:
            await effect(conn, call, "prepare")
            if call.operation == "no":
                raise Refuse("no thanks")
            if call.operation == "later":
                raise NotYet("not ready")
            if call.operation == "boom":
                raise RuntimeError("boom")
            if call.operation == "read":
                return Vote.READ_ONLY
            if call.operation == "hot":
                await conn.execute("UPDATE hot SET n = n + 1 WHERE id = 1")
            return None

        @app.commit(op)
        async def commit(conn: Conn, call: BranchCall) -> None:
            await effect(conn, call, "commit")

        @app.abort(op)
        async def abort(conn: Conn, call: BranchCall) -> None:
            await effect(conn, call, "abort")

    @app.execute("step")
    async def step(conn: Conn, call: BranchCall) -> bytes | None:
        await effect(conn, call, "execute")
        if call.payload == b"refuse":
            raise Refuse("cannot")
        if call.payload == b"later":
            raise NotYet("wait")
        if call.payload == b"hot":
            await conn.execute("UPDATE hot SET n = n + 1 WHERE id = 1")
        return b"result" if call.payload == b"bytes" else None

    @app.compensate("undo")
    async def undo(conn: Conn, call: BranchCall) -> None:
        await effect(conn, call, "compensate")

    return app


def bc(gid: str = "g1", branch: str = "b1", operation: str = "ok", **kw: Any) -> BranchCall:
    return BranchCall(gid=gid, branch_id=branch, operation=operation, **kw)


@pytest.fixture
def runs() -> list[tuple[str, str, str]]:
    return []


async def open_service(url: str, runs: list[tuple[str, str, str]], **kw: Any) -> ParticipantService:
    service = ParticipantService(
        counting_app(runs), PostgresBackend(url, lock_timeout_s=0.5, pool_size=25, **kw)
    )
    await service.open()
    return service


@pytest.fixture
async def svc(pg_url: str, runs: list[tuple[str, str, str]]) -> AsyncIterator[ParticipantService]:
    service = await open_service(pg_url, runs)
    yield service
    await service.close()


async def query(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchall() if cur.description is not None else []


async def effects(url: str) -> list[tuple[str, str, str]]:
    rows = await query(url, "SELECT gid, branch_id, phase FROM effects ORDER BY seq")
    return [(str(g), str(b), str(p)) for g, b, p in rows]


async def branch_state(url: str, gid: str = "g1", branch: str = "b1") -> str | None:
    rows = await query(
        url, "SELECT state FROM accord_branches WHERE gid = %s AND branch_id = %s", (gid, branch)
    )
    return str(rows[0][0]) if rows else None


async def prepared_xacts(url: str) -> list[str]:
    """The names of the database's prepared transactions, without ``accord:<oid>:``."""
    rows = await query(
        url, "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY gid"
    )
    return [str(r[0]).split(":", 2)[2] for r in rows]


async def xact_name(url: str, gid: str = "g1", branch: str = "b1") -> str:
    [(oid,)] = await query(url, "SELECT oid FROM pg_database WHERE datname = current_database()")
    return transaction_name(int(oid), gid, branch)


async def test_prepare_is_a_prepared_transaction_and_duplicates_run_once(
    svc: ParticipantService, pg_url: str, runs: list[tuple[str, str, str]]
) -> None:
    for _ in range(3):
        r = await svc.call(Op.PREPARE, bc())
        assert r.status is Status.OK and r.message == "prepared"
    assert await prepared_xacts(pg_url) == ["g1/b1"]
    assert await effects(pg_url) == []  # invisible until COMMIT PREPARED
    assert await branch_state(pg_url) == "PREPARED"
    assert (await svc.branch_counts())["PREPARED"] == 1
    for _ in range(3):
        r = await svc.call(Op.COMMIT, bc())
        assert r.status is Status.OK and r.message == "committed"
    assert runs == [("prepare", "g1", "b1"), ("commit", "g1", "b1")]
    assert await effects(pg_url) == [("g1", "b1", "prepare"), ("g1", "b1", "commit")]
    assert await branch_state(pg_url) == "COMMITTED"
    assert await prepared_xacts(pg_url) == []
    audit = await query(pg_url, "SELECT op, outcome FROM accord_audit ORDER BY seq")
    assert audit[:2] == [("prepare", "PREPARED"), ("prepare", "DUPLICATE")]
    assert ("commit", "COMMITTED") in audit


async def test_concurrent_duplicates_run_once(
    svc: ParticipantService, runs: list[tuple[str, str, str]]
) -> None:
    results = await asyncio.gather(*(svc.call(Op.PREPARE, bc()) for _ in range(8)))
    assert {r.status for r in results} <= {Status.OK, Status.NOT_YET}
    assert (await svc.call(Op.PREPARE, bc())).ok
    results = await asyncio.gather(*(svc.call(Op.ABORT, bc()) for _ in range(8)))
    assert {r.status for r in results} <= {Status.OK, Status.NOT_YET}
    assert (await svc.call(Op.ABORT, bc())).message == "aborted"
    assert runs == [("prepare", "g1", "b1"), ("abort", "g1", "b1")]


async def test_abort_before_prepare_is_noop_and_refuses_late_prepare(
    svc: ParticipantService, pg_url: str, runs: list[tuple[str, str, str]]
) -> None:
    r = await svc.call(Op.ABORT, bc())
    assert r.status is Status.OK and "before prepare" in r.message
    assert await branch_state(pg_url) == "ABORTED"
    late = await svc.call(Op.PREPARE, bc())
    assert late.status is Status.REFUSED and "already aborted" in late.message
    assert (await svc.call(Op.ABORT, bc())).status is Status.OK  # duplicate abort
    assert runs == []
    assert await prepared_xacts(pg_url) == []
    assert (await svc.branch_counts())["ABORTED"] == 1


async def test_abort_of_a_prepared_branch_rolls_it_back_and_refuses_a_late_prepare(
    svc: ParticipantService, pg_url: str, runs: list[tuple[str, str, str]]
) -> None:
    assert (await svc.call(Op.PREPARE, bc())).ok
    r = await svc.call(Op.ABORT, bc())
    assert r.status is Status.OK and r.message == "aborted"
    assert await prepared_xacts(pg_url) == []
    assert await effects(pg_url) == [("g1", "b1", "abort")]  # the prepare's write is gone
    late = await svc.call(Op.PREPARE, bc())
    assert late.status is Status.REFUSED and "already aborted" in late.message
    assert (await svc.call(Op.COMMIT, bc())).status is Status.CONFLICT
    assert [run[0] for run in runs] == ["prepare", "abort"]


async def test_refused_prepare_is_recorded_and_rolled_back(
    svc: ParticipantService, pg_url: str, runs: list[tuple[str, str, str]]
) -> None:
    for _ in range(2):
        r = await svc.call(Op.PREPARE, bc(operation="no"))
        assert r.status is Status.REFUSED and r.message == "no thanks"
    assert runs == [("prepare", "g1", "b1")]
    assert await effects(pg_url) == []
    assert await prepared_xacts(pg_url) == []
    r = await svc.call(Op.ABORT, bc(operation="no"))
    assert r.status is Status.OK and r.message.startswith("no-op")
    assert [run[0] for run in runs] == ["prepare"]
    assert (await svc.call(Op.COMMIT, bc(operation="no"))).status is Status.CONFLICT


async def test_not_yet_and_errors_are_not_recorded(
    svc: ParticipantService, pg_url: str, runs: list[tuple[str, str, str]]
) -> None:
    for _ in range(2):
        r = await svc.call(Op.PREPARE, bc(operation="later"))
        assert r.status is Status.NOT_YET and r.message == "not ready"
    assert len(runs) == 2
    with pytest.raises(RuntimeError, match="boom"):
        await svc.call(Op.PREPARE, bc("g2", operation="boom"))
    assert await effects(pg_url) == []
    assert await prepared_xacts(pg_url) == []
    # Not recorded: the Prepare can still succeed.
    assert (await svc.call(Op.PREPARE, bc("g2"))).ok


async def test_read_only_vote_commits_locally(
    svc: ParticipantService, pg_url: str, runs: list[tuple[str, str, str]]
) -> None:
    r = await svc.call(Op.PREPARE, bc(operation="read"))
    assert r.status is Status.OK and r.read_only
    assert await prepared_xacts(pg_url) == []
    assert await branch_state(pg_url) == "READ_ONLY"
    assert (await svc.call(Op.COMMIT, bc(operation="read"))).status is Status.OK
    assert (await svc.call(Op.ABORT, bc(operation="read"))).status is Status.OK
    assert [run[0] for run in runs] == ["prepare"]


async def test_commit_without_prepare_is_refused(
    svc: ParticipantService, runs: list[tuple[str, str, str]]
) -> None:
    r = await svc.call(Op.COMMIT, bc())
    assert r.status is Status.CONFLICT and "without a prepare" in r.message
    assert (await svc.call(Op.PREPARE, bc())).status is Status.OK


async def test_commit_after_abort_and_abort_after_commit_are_refused(
    svc: ParticipantService, pg_url: str
) -> None:
    await svc.call(Op.PREPARE, bc("ga"))
    await svc.call(Op.ABORT, bc("ga"))
    r = await svc.call(Op.COMMIT, bc("ga"))
    assert r.status is Status.CONFLICT and "already aborted" in r.message
    await svc.call(Op.PREPARE, bc("gc"))
    await svc.call(Op.COMMIT, bc("gc"))
    r = await svc.call(Op.ABORT, bc("gc"))
    assert r.status is Status.CONFLICT and "already committed" in r.message
    assert await branch_state(pg_url, "ga") == "ABORTED"
    assert await branch_state(pg_url, "gc") == "COMMITTED"


async def test_one_phase_commit(
    svc: ParticipantService, pg_url: str, runs: list[tuple[str, str, str]]
) -> None:
    for _ in range(2):
        r = await svc.call(Op.COMMIT, bc(one_phase=True))
        assert r.status is Status.OK and "one phase" in r.message
    assert runs == [("prepare", "g1", "b1"), ("commit", "g1", "b1")]
    assert await branch_state(pg_url) == "COMMITTED"
    assert await prepared_xacts(pg_url) == []
    assert (await svc.call(Op.PREPARE, bc())).status is Status.OK
    assert len(runs) == 2
    for _ in range(2):
        r = await svc.call(Op.COMMIT, bc("g2", operation="no", one_phase=True))
        assert r.status is Status.REFUSED and r.message == "no thanks"
    assert await branch_state(pg_url, "g2") == "ABORTED"
    await svc.call(Op.ABORT, bc("g3"))
    r = await svc.call(Op.COMMIT, bc("g3", one_phase=True))
    assert r.status is Status.REFUSED and "aborted" in r.message


async def test_commit_and_abort_from_another_instance(
    pg_url: str, runs: list[tuple[str, str, str]]
) -> None:
    first = await open_service(pg_url, runs)
    second = await open_service(pg_url, runs)
    try:
        assert (await first.call(Op.PREPARE, bc("g1", payload=b"p1"))).ok
        assert (await first.call(Op.PREPARE, bc("g2", payload=b"p2"))).ok
        await first.close()  # gone: the database holds the prepared transactions
        # The other instance never saw the Prepares, and gets the prepared payload.
        assert (await second.call(Op.PREPARE, bc("g1", payload=b"p1"))).duplicate
        assert (await second.call(Op.COMMIT, bc("g1", operation="", payload=b""))).ok
        assert (await second.call(Op.ABORT, bc("g2"))).message == "aborted"
        assert await prepared_xacts(pg_url) == []
        assert await effects(pg_url) == [
            ("g1", "b1", "prepare"),
            ("g1", "b1", "commit"),
            ("g2", "b1", "abort"),
        ]
    finally:
        await first.close()
        await second.close()


async def test_commit_recorded_after_a_crash_between_commit_prepared_and_its_record(
    svc: ParticipantService, pg_url: str, runs: list[tuple[str, str, str]]
) -> None:
    # COMMIT PREPARED done by someone (a crashed instance), its outcome never recorded.
    assert (await svc.call(Op.PREPARE, bc())).ok
    await query(pg_url, f"COMMIT PREPARED '{await xact_name(pg_url)}'")
    assert (await svc.call(Op.ABORT, bc())).status is Status.CONFLICT  # it is committed
    r = await svc.call(Op.COMMIT, bc())
    assert r.status is Status.OK and r.message == "committed"
    assert await branch_state(pg_url) == "COMMITTED"
    assert [run[0] for run in runs] == ["prepare", "commit"]


async def test_abort_recorded_after_a_crash_between_rollback_prepared_and_its_record(
    svc: ParticipantService, pg_url: str, runs: list[tuple[str, str, str]]
) -> None:
    assert (await svc.call(Op.PREPARE, bc())).ok
    # What an Abort does before its record: mark, ROLLBACK PREPARED; then a crash.
    await query(pg_url, "UPDATE accord_branches SET state = 'ABORTING'")
    await query(pg_url, f"ROLLBACK PREPARED '{await xact_name(pg_url)}'")
    assert (await svc.call(Op.PREPARE, bc())).status is Status.REFUSED  # late, refused
    assert (await svc.call(Op.COMMIT, bc())).status is Status.CONFLICT
    r = await svc.call(Op.ABORT, bc())
    assert r.status is Status.OK and r.message == "aborted"
    assert await branch_state(pg_url) == "ABORTED"
    assert (await svc.call(Op.PREPARE, bc())).status is Status.REFUSED
    assert [run[0] for run in runs] == ["prepare", "abort"]


async def test_abort_racing_a_prepare_in_progress(
    pg_url: str, runs: list[tuple[str, str, str]]
) -> None:
    # The Prepare holds a lock the Abort's record waits for: the Abort looks again and
    # rolls the prepared transaction back.
    svc = await open_service(pg_url, runs)
    gate = asyncio.Event()
    app = counting_app(runs)

    @app.prepare("slow")
    async def slow(conn: Conn, call: BranchCall) -> None:
        gate.set()
        await asyncio.sleep(0.3)

    slow_svc = ParticipantService(app, PostgresBackend(pg_url, lock_timeout_s=2.0))
    await slow_svc.open()
    try:
        prepare = asyncio.create_task(slow_svc.call(Op.PREPARE, bc(operation="slow")))
        await gate.wait()
        abort = await svc.call(Op.ABORT, bc(operation="slow"))
        vote = await prepare
        assert abort.status is Status.OK
        # Either the Prepare got in first (rolled back by the Abort) or it was refused.
        assert vote.status in (Status.OK, Status.REFUSED)
        assert await prepared_xacts(pg_url) == []
        assert (await svc.call(Op.PREPARE, bc(operation="slow"))).status is Status.REFUSED
    finally:
        await slow_svc.close()
        await svc.close()


async def test_lock_timeout_in_prepare_is_a_no_vote_and_in_a_saga_step_not_yet(
    svc: ParticipantService, pg_url: str
) -> None:
    # The first branch holds the hot row prepared; the second waits lock_timeout (0.5 s).
    assert (await svc.call(Op.PREPARE, bc("g1", operation="hot"))).ok
    r = await svc.call(Op.PREPARE, bc("g2", operation="hot"))
    assert r.status is Status.REFUSED and "lock" in r.message
    assert (await svc.call(Op.PREPARE, bc("g2", operation="hot"))).status is Status.REFUSED
    r = await svc.call(Op.EXECUTE, bc("g3", operation="step", payload=b"hot"))
    assert r.status is Status.NOT_YET and "lock" in r.message
    assert (await svc.call(Op.COMMIT, bc("g1", operation="hot"))).ok
    assert (await svc.call(Op.EXECUTE, bc("g3", operation="step", payload=b"hot"))).ok
    assert await query(pg_url, "SELECT n FROM hot") == [(2,)]


async def test_saga_execute_compensate(
    svc: ParticipantService, pg_url: str, runs: list[tuple[str, str, str]]
) -> None:
    for _ in range(2):
        r = await svc.call(Op.EXECUTE, bc("g1", "s1", "step", payload=b"bytes"))
        assert r.ok and r.result == b"result"
    for _ in range(2):
        r = await svc.call(Op.COMPENSATE, bc("g1", "s1", "undo"))
        assert r.ok and r.message == "compensated"
    # Compensation before its action: a recorded no-op; the late action is refused.
    r = await svc.call(Op.COMPENSATE, bc("g2", "s1", "undo"))
    assert r.ok and "before the action" in r.message
    late = await svc.call(Op.EXECUTE, bc("g2", "s1", "step"))
    assert late.status is Status.REFUSED and "already compensated" in late.message
    # A refused action: recorded, its changes undone; its compensation a no-op.
    for _ in range(2):
        r = await svc.call(Op.EXECUTE, bc("g3", "s1", "step", payload=b"refuse"))
        assert r.status is Status.REFUSED and r.message == "cannot"
    assert "nothing to undo" in (await svc.call(Op.COMPENSATE, bc("g3", "s1", "undo"))).message
    r = await svc.call(Op.EXECUTE, bc("g4", "s1", "step", payload=b"later"))
    assert r.status is Status.NOT_YET
    assert await effects(pg_url) == [("g1", "s1", "execute"), ("g1", "s1", "compensate")]
    assert [run[:2] for run in runs] == [
        ("execute", "g1"),
        ("compensate", "g1"),
        ("execute", "g3"),
        ("execute", "g4"),
    ]


async def test_concurrent_execute_and_compensate(
    svc: ParticipantService, pg_url: str, runs: list[tuple[str, str, str]]
) -> None:
    for i in range(10):
        gid = f"g{i}"
        await asyncio.gather(
            svc.call(Op.EXECUTE, bc(gid, "s", "step")),
            svc.call(Op.COMPENSATE, bc(gid, "s", "undo")),
        )
        for op, name in ((Op.EXECUTE, "step"), (Op.COMPENSATE, "undo")):
            for _ in range(50):
                if (await svc.call(op, bc(gid, "s", name))).status is not Status.NOT_YET:
                    break
                await asyncio.sleep(0.05)
    phases: dict[str, list[str]] = {}
    for gid, _, phase in await effects(pg_url):
        phases.setdefault(gid, []).append(phase)
    # Each step either ran and was compensated once, or never ran (null compensation).
    assert all(p == ["execute", "compensate"] for p in phases.values()), phases


async def test_fencing(
    svc: ParticipantService, pg_url: str, runs: list[tuple[str, str, str]]
) -> None:
    assert (await svc.call(Op.PREPARE, bc("g1", shard="s1", epoch=5))).ok
    r = await svc.call(Op.PREPARE, bc("g2", shard="s1", epoch=4))
    assert r.status is Status.FENCED and r.message == "fenced: epoch 4 < 5 for shard 's1'"
    assert (await svc.call(Op.COMMIT, bc("g1", shard="s1", epoch=4))).status is Status.FENCED
    assert (await svc.call(Op.COMMIT, bc("g1", shard="s1", epoch=7))).ok
    assert await query(pg_url, "SELECT epoch FROM accord_fence WHERE shard = 's1'") == [(7,)]
    assert (await svc.call(Op.PREPARE, bc("g3", shard="s1", epoch=5))).status is Status.FENCED
    assert (await svc.call(Op.PREPARE, bc("g4", shard="s2", epoch=1))).ok
    assert (await svc.call(Op.PREPARE, bc("g5", shard="s1", epoch=0))).ok
    r = await svc.call(Op.PREPARE, bc("g6", operation="no", shard="s3", epoch=3))
    assert r.status is Status.REFUSED
    assert await query(pg_url, "SELECT epoch FROM accord_fence WHERE shard = 's3'") == [(3,)]
    assert [run[1] for run in runs] == ["g1", "g1", "g4", "g5", "g6"]


async def test_in_doubt_lists_prepared_branches_for_any_instance(
    pg_url: str, runs: list[tuple[str, str, str]]
) -> None:
    first = await open_service(pg_url, runs)
    call = bc(payload=b"data", coordinator_address="127.0.0.1:1", shard="s", epoch=2)
    await first.call(Op.PREPARE, call)
    await first.close()
    second = await open_service(pg_url, runs)
    try:
        [branch] = await second.in_doubt(0.0)
        assert (branch.gid, branch.branch_id, branch.state) == ("g1", "b1", "PREPARED")
        assert (branch.payload, branch.coordinator_address) == (b"data", "127.0.0.1:1")
        assert (branch.shard, branch.epoch) == ("s", 2)
        [pending] = await second.pending()
        assert (pending.gid, pending.transaction) == ("g1", await xact_name(pg_url))
        assert pending.coordinator_address == "127.0.0.1:1"
        assert (await second.call(Op.COMMIT, call)).message == "committed"
        assert await second.in_doubt(0.0) == []
        assert await second.pending() == []
    finally:
        await second.close()


async def test_too_long_names_are_invalid(svc: ParticipantService) -> None:
    r = await svc.call(Op.PREPARE, bc("g" * 190, "b" * 20))
    assert r.status is Status.INVALID and "too long" in r.message
