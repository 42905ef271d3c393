"""The query backend without coordinators: the change stream, health, /healthz and the
gRPC error mapping, with FeedEvents applied directly."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer

import accord.v1 as pb
from accord.common.transport import bind, make_channel, make_server
from accord.query import QueryApp, SqliteStore, StoreLockedError, build_http_app
from accord.query._service import QueryServicer
from tests.unit import _query_events as ev


@pytest.fixture
async def app(tmp_path: Path):
    a = QueryApp(SqliteStore(tmp_path / "q.db"))
    await a.start()
    yield a
    await a.stop()


async def test_changes_stream_every_applied_change(app: QueryApp):
    got: list[pb.TransactionSummary] = []

    async def consume() -> None:
        async for s in app.changes():
            got.append(s)
            if len(got) == 2:
                return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    await app._apply("s1", ev.two_pc("s1:a", 1, ["bank-a"]))
    await app._apply("s1", ev.two_pc("s1:a", 1, ["bank-a"]))  # duplicates: no change
    # Two events of one transaction in a batch: one change, its last version.
    await app._apply("s1", [ev.begun("s1:b", 4), ev.abort("s1:b", 5, "client")])
    await asyncio.wait_for(task, 5)
    assert [(s.gid, s.state) for s in got] == [
        ("s1:a", pb.TXN_STATE_COMMITTED),
        ("s1:b", pb.TXN_STATE_ABORTING),
    ]


async def test_a_slow_subscriber_is_dropped(app: QueryApp):
    stream = app.changes(buffer=2)

    async def next_change() -> pb.TransactionSummary:
        return await anext(stream)

    first = asyncio.create_task(next_change())
    await asyncio.sleep(0)
    await app._apply("s1", [ev.begun("s1:x", 1)])
    assert (await first).gid == "s1:x"
    # Five changes at once overflow its buffer of two: the stream ends (re-list, resubscribe).
    await app._apply("s1", [ev.begun(f"s1:{i}", i + 2) for i in range(5)])
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_store_lock(tmp_path: Path, app: QueryApp):
    other = QueryApp(SqliteStore(tmp_path / "q.db"))
    with pytest.raises(StoreLockedError):
        await other.start()


async def test_healthz(app: QueryApp):
    client = TestClient(TestServer(build_http_app(app)))
    await client.start_server()
    try:
        resp = await client.get("/healthz")
        assert resp.status == 200 and (await resp.json())["healthy"] is True
        app.set_owners({"s1": "127.0.0.1:1"})  # a shard whose owner cannot be reached
        resp = await client.get("/healthz")
        body = await resp.json()
        assert resp.status == 503 and body["shards"][0]["shard"] == "s1"
        assert body["shards"][0]["connected"] is False and "s1" in body["reasons"][0]
    finally:
        await client.close()


async def test_grpc_errors(app: QueryApp):
    server, settings = make_server()
    port = bind(server, "127.0.0.1:0", settings)
    pb.add_QueryServicer_to_server(QueryServicer(app), server)
    await server.start()
    try:
        async with make_channel(f"127.0.0.1:{port}") as ch:
            stub = pb.QueryStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.GetTransaction(pb.QueryGetRequest(gid="s1:nope"))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ListTransactions(pb.QueryListRequest(page_size=1001))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "1000" in (e.value.details() or "")
            await app._apply("s1", ev.two_pc("s1:a", 1, ["bank-a"]))
            view = await stub.GetTransaction(pb.QueryGetRequest(gid="s1:a"))
            assert len(view.timeline) == 3
    finally:
        await server.stop(None)
