"""Both ways of writing a participant, served over a real in-process grpc.aio server:
the result contract's status codes, health checking, reflection, trace context."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import accord.v1 as pb
from accord.common.transport import make_channel
from accord.participants import (
    PARTICIPANT_SERVICE_NAME,
    BranchCall,
    NotYet,
    Participant,
    ParticipantApp,
    ParticipantServer,
    Refuse,
    Vote,
)

SCHEMA = "CREATE TABLE IF NOT EXISTS stock (item TEXT PRIMARY KEY, free INTEGER, held INTEGER)"


# -- decorator style: a ten-line inventory ---------------------------------------------

inventory = ParticipantApp("inventory")
seen: list[BranchCall] = []


@inventory.setup
def schema(conn: sqlite3.Connection) -> None:
    conn.execute(SCHEMA)
    conn.execute("INSERT OR IGNORE INTO stock VALUES ('apple', 2, 0)")


@inventory.prepare("reserve")
def reserve(conn: sqlite3.Connection, call: BranchCall) -> Vote | None:
    item = call.json()["item"]
    sql = "UPDATE stock SET free = free - 1, held = held + 1 WHERE item = ? AND free > 0"
    if conn.execute(sql, (item,)).rowcount == 0:
        raise Refuse(f"out of stock: {item}")
    return None


@inventory.commit("reserve")
def ship(conn: sqlite3.Connection, call: BranchCall) -> None:
    conn.execute("UPDATE stock SET held = held - 1 WHERE item = ?", (call.json()["item"],))


@inventory.abort("reserve")
def release(conn: sqlite3.Connection, call: BranchCall) -> None:
    item = call.json()["item"]
    conn.execute("UPDATE stock SET free = free + 1, held = held - 1 WHERE item = ?", (item,))


@inventory.prepare("wait")
def wait(conn: sqlite3.Connection, call: BranchCall) -> Vote | None:
    raise NotYet("come back later")


@inventory.prepare("crash")
def crash(conn: sqlite3.Connection, call: BranchCall) -> Vote | None:
    raise ZeroDivisionError("secret detail")


@inventory.prepare("peek")
def peek(conn: sqlite3.Connection, call: BranchCall) -> Vote | None:
    seen.append(call)
    return Vote.READ_ONLY


# -- subclass style: a counter ------------------------------------------------------------


class Counter(Participant):
    service = "counter"

    def setup(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS counter (n INTEGER)")
        if conn.execute("SELECT COUNT(*) FROM counter").fetchone()[0] == 0:
            conn.execute("INSERT INTO counter VALUES (0)")

    def prepare(self, conn: sqlite3.Connection, call: BranchCall) -> Vote | None:
        if call.operation != "add":
            raise Refuse(f"counter cannot {call.operation!r}")
        return Vote.YES

    def commit(self, conn: sqlite3.Connection, call: BranchCall) -> None:
        conn.execute("UPDATE counter SET n = n + ?", (int(call.payload),))


@pytest.fixture
async def inv(tmp_path: Path) -> AsyncIterator[tuple[ParticipantServer, pb.ParticipantStub]]:
    seen.clear()
    async with ParticipantServer(inventory, db=tmp_path / "inv.db") as srv:
        channel = make_channel(srv.address)
        yield srv, pb.ParticipantStub(channel)
        await channel.close()


def req(
    gid: str,
    operation: str = "reserve",
    *,
    shard: str = "",
    epoch: int = 0,
    trace_context: dict[str, str] | None = None,
) -> pb.BranchRequest:
    return pb.BranchRequest(
        gid=gid,
        branch_id="b1",
        operation=operation,
        payload=b'{"item": "apple"}',
        shard=shard,
        epoch=epoch,
        trace_context=trace_context or {},
    )


async def stock(srv: ParticipantServer) -> tuple[int, int]:
    row = await srv.store.read(
        lambda c: c.execute("SELECT free, held FROM stock WHERE item = 'apple'").fetchone()
    )
    return int(row[0]), int(row[1])


async def code_of(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


async def test_decorator_style_over_grpc(inv: tuple[ParticipantServer, pb.ParticipantStub]) -> None:
    srv, stub = inv
    reply = await stub.Prepare(req("g1"))
    assert reply.message == "prepared" and not reply.read_only
    assert await stock(srv) == (1, 1)
    await stub.Commit(req("g1"))
    assert await stock(srv) == (1, 0)
    await stub.Prepare(req("g2"))
    await stub.Abort(req("g2"))
    await stub.Abort(req("g2"))  # duplicate
    assert await stock(srv) == (1, 0)
    assert (await stub.Prepare(req("g3", "peek"))).read_only


async def test_status_codes(inv: tuple[ParticipantServer, pb.ParticipantStub]) -> None:
    _, stub = inv
    await stub.Prepare(req("g1"))
    await stub.Prepare(req("g2"))
    assert await code_of(stub.Prepare(req("g3"))) == (
        grpc.StatusCode.ABORTED,
        "out of stock: apple",
    )
    code, details = await code_of(stub.Prepare(req("g4", "fly")))
    assert code == grpc.StatusCode.ABORTED and "unknown operation 'fly'" in details
    assert await code_of(stub.Prepare(req("g5", "wait"))) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "come back later",
    )
    code, details = await code_of(stub.Prepare(req("g6", "crash")))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in details
    code, _ = await code_of(stub.Commit(req("never-prepared")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, _ = await code_of(stub.Prepare(pb.BranchRequest(gid="", branch_id="b1")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, details = await code_of(stub.Execute(req("g7")))
    assert code == grpc.StatusCode.ABORTED and "unknown operation 'reserve'" in details
    await stub.Prepare(req("g8", "peek", shard="s", epoch=9))
    code, details = await code_of(stub.Prepare(req("g9", "peek", shard="s", epoch=8)))
    assert (code, details) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "fenced: epoch 8 < 9 for shard 's'",
    )


async def test_trace_context_from_request_or_metadata(
    inv: tuple[ParticipantServer, pb.ParticipantStub],
) -> None:
    _, stub = inv
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await stub.Prepare(req("g1", "peek"), metadata=(("traceparent", tp),))
    await stub.Prepare(req("g2", "peek", trace_context={"traceparent": tp, "tracestate": "a=1"}))
    await stub.Prepare(req("g3", "peek"))
    assert [c.gid for c in seen] == ["g1", "g2", "g3"]
    assert seen[0].traceparent == tp
    assert dict(seen[1].trace_context) == {"traceparent": tp, "tracestate": "a=1"}
    assert seen[2].traceparent is None


async def test_subclass_style(tmp_path: Path) -> None:
    async with ParticipantServer(Counter(), db=tmp_path / "c.db") as srv:
        channel = make_channel(srv.address)
        stub = pb.ParticipantStub(channel)
        add = pb.BranchRequest(gid="g", branch_id="b", operation="add", payload=b"5")
        await stub.Prepare(add)
        await stub.Commit(add)
        await stub.Commit(add)
        one = pb.BranchRequest(
            gid="h", branch_id="b", operation="add", payload=b"2", one_phase=True
        )
        await stub.Commit(one)
        code, details = await code_of(
            stub.Prepare(pb.BranchRequest(gid="i", branch_id="b", operation="sub"))
        )
        assert (code, details) == (grpc.StatusCode.ABORTED, "counter cannot 'sub'")
        assert await srv.store.read(lambda c: c.execute("SELECT n FROM counter").fetchone()) == (7,)
        await channel.close()


async def test_health_and_reflection(inv: tuple[ParticipantServer, pb.ParticipantStub]) -> None:
    srv, _ = inv
    channel = make_channel(srv.address)
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", PARTICIPANT_SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    names: list[str] = []
    async for reply in refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    ):
        names += [s.name for s in reply.list_services_response.service]
    assert PARTICIPANT_SERVICE_NAME in names and "grpc.health.v1.Health" in names
    await channel.close()


async def test_stop_is_graceful_and_idempotent(tmp_path: Path) -> None:
    srv = ParticipantServer(Counter(), db=tmp_path / "s.db")
    await srv.start()
    port = srv.port
    assert srv.address == f"127.0.0.1:{port}"
    await srv.stop()
    await srv.stop()
    # The database is closed cleanly and can be served again.
    async with ParticipantServer(Counter(), db=tmp_path / "s.db") as again:
        assert again.port > 0


# -- the app names its database ----------------------------------------------------------


async def test_the_app_names_its_database(tmp_path: Path) -> None:
    app = ParticipantApp("ledger", db=str(tmp_path / "ledger.db"))
    app.setup(lambda conn: conn.execute("CREATE TABLE entries (n INTEGER)"))
    async with ParticipantServer(app) as srv:
        assert srv.backend.location == str(tmp_path / "ledger.db")
    tables = sqlite3.connect(tmp_path / "ledger.db").execute(
        "SELECT name FROM sqlite_master WHERE name = 'entries'"
    )
    assert tables.fetchall() == [("entries",)]
    with pytest.raises(ValueError, match="no database"):
        ParticipantServer(ParticipantApp("nowhere"))
