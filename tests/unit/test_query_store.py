"""The read model on SQLite: exactly-once application by LSN, snapshots, every filter
and order, keyset pages, bad input, the timeline, stats."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import accord.v1 as pb
from accord.query import InvalidArgument, NotFound
from accord.query._read import get_transaction, list_transactions, stats
from accord.query._store import SqliteStore
from tests.unit import _query_events as ev

NOW = ev.T0 + 10 * 60_000


@pytest.fixture
async def store(tmp_path: Path):
    s = SqliteStore(tmp_path / "q.db")
    await s.open()
    yield s
    await s.close()


async def gids(store, **kw) -> list[str]:
    order = kw.pop("order", 0)
    size = kw.pop("page_size", 0)
    req = pb.QueryListRequest(filter=pb.TransactionFilter(**kw), order=order, page_size=size)
    resp = await list_transactions(store, req, now_ms=NOW)
    return [t.gid for t in resp.transactions]


async def test_batch_and_lsn_in_one_transaction_duplicates_skipped(store, tmp_path):
    events = ev.two_pc("s1:a", 1, ["bank-a", "bank-b"]) + ev.two_pc("s1:b", 4, ["bank-b"])
    done = await store.apply("s1", events, now_ms=NOW)
    assert (done.applied, done.skipped, done.position) == (6, 0, 6)
    assert {r.gid for r in done.rows} == {"s1:a", "s1:b"}
    assert (await store.positions())["s1"].applied_lsn == 6
    # Resumed from an earlier LSN: everything at or below 6 is skipped, the rest applied.
    again = await store.apply("s1", [*events[3:], ev.begun("s1:c", 7)], now_ms=NOW)
    assert (again.applied, again.skipped, again.position) == (1, 3, 7)
    view = await get_transaction(store, "s1:a")
    assert [e.lsn for e in view.timeline] == [1, 2, 3]  # no entry twice
    # Another shard's position is its own.
    await store.apply("s2", ev.two_pc("s2:a", 1, ["bank-a"], shard="s2"), now_ms=NOW)
    pos = await store.positions()
    assert pos["s1"].applied_lsn == 7 and pos["s2"].applied_lsn == 3
    # What is on disk is what was committed (a fresh connection sees it).
    conn = sqlite3.connect(tmp_path / "q.db")
    assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 10
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_out_of_order_within_a_batch_never_goes_back(store):
    done = await store.apply("s1", [ev.begun("s1:a", 5), ev.abort("s1:a", 3, "older")], now_ms=NOW)
    assert (done.applied, done.skipped, done.position) == (1, 1, 5)
    view = await get_transaction(store, "s1:a")
    assert view.summary.state == pb.TXN_STATE_ACTIVE


async def test_failed_batch_changes_nothing(store, monkeypatch):
    await store.apply("s1", ev.two_pc("s1:a", 1, ["bank-a"]), now_ms=NOW)
    import accord.query._store as st

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(st, "_write", boom)
    with pytest.raises(RuntimeError):
        await store.apply("s1", ev.two_pc("s1:b", 4, ["bank-a"]), now_ms=NOW)
    monkeypatch.undo()
    assert (await store.positions())["s1"].applied_lsn == 3
    with pytest.raises(NotFound):
        await get_transaction(store, "s1:b")


async def test_snapshot_then_end_moves_the_lsn(store):
    txn = pb.Transaction(
        gid="s1:x", protocol=pb.PROTOCOL_SAGA, state=pb.TXN_STATE_RUNNING, created_unix_ms=ev.T0
    )
    done = await store.apply("s1", [ev.snapshot(txn, 100)], now_ms=NOW)
    assert done.applied == 1 and done.position == 0  # not moved until SNAPSHOT_END
    # A snapshot cut short and sent again is applied again (an upsert), then ends.
    done = await store.apply("s1", [ev.snapshot(txn, 100), ev.snapshot_end(100)], now_ms=NOW)
    assert done.position == 100
    assert (await store.positions())["s1"].applied_lsn == 100
    view = await get_transaction(store, "s1:x")
    assert view.summary.state == pb.TXN_STATE_RUNNING
    assert [e.kind for e in view.timeline] == [pb.FEED_EVENT_KIND_SNAPSHOT]
    # The feed goes on after the snapshot's LSN.
    await store.apply(
        "s1", [ev.snapshot(txn, 100), ev.saga_state("s1:x", 101, pb.TXN_STATE_STUCK)], now_ms=NOW
    )
    assert (await get_transaction(store, "s1:x")).summary.state == pb.TXN_STATE_STUCK


async def _load(store) -> None:
    """Ten transactions over two shards, one a minute apart."""
    lsn = {"s1": 1, "s2": 1}
    batches: dict[str, list[pb.FeedEvent]] = {"s1": [], "s2": []}
    for i in range(10):
        shard = "s1" if i % 2 == 0 else "s2"
        gid = f"{shard}:{i:04d}"
        t = i * 60_000
        n = lsn[shard]
        if i == 9:  # a saga stuck
            batches[shard] += [
                ev.saga_started(gid, n, [("x", "bank-c")], shard=shard, t=t),
                ev.step(gid, n + 1, 0, pb.BRANCH_STATE_FAILED, shard=shard, t=t),
                ev.saga_state(gid, n + 2, pb.TXN_STATE_STUCK, shard=shard, t=t + 500),
            ]
        elif i == 8:  # a 2PC in phase two
            batches[shard] += [
                ev.preparing(gid, n, ["bank-a"], shard=shard, t=t, key=f"key-{i}"),
                ev.commit(gid, n + 1, ["b1"], shard=shard, t=t),
                ev.begun(f"{shard}:zz", n + 2, shard=shard, t=t),
            ]
        else:
            services = ["bank-a", "bank-b"] if i % 3 else ["bank-b"]
            batches[shard] += ev.two_pc(
                gid, n, services, t=t, dur=10 * (i + 1), shard=shard, key=f"key-{i}"
            )
        lsn[shard] = n + 3
    for shard, events in batches.items():
        await store.apply(shard, events, now_ms=NOW)


async def test_filters(store):
    await _load(store)
    everything = await gids(store)
    assert len(everything) == 11
    assert await gids(store, states=[pb.TXN_STATE_STUCK]) == ["s2:0009"]
    assert await gids(store, stuck=True) == ["s2:0009"]
    assert await gids(store, stuck=True, states=[pb.TXN_STATE_COMMITTED]) == []
    assert await gids(store, phase_two_pending=True) == ["s1:0008"]
    assert await gids(store, protocols=[pb.PROTOCOL_SAGA]) == ["s2:0009"]
    assert await gids(store, shards=["s2"], states=[pb.TXN_STATE_COMMITTED]) == [
        "s2:0007",
        "s2:0005",
        "s2:0003",
        "s2:0001",
    ]
    only_b = await gids(store, services=["bank-b"])
    assert "s1:0000" in only_b and "s1:0008" not in only_b and len(only_b) == 8
    assert await gids(store, services=["bank-c"]) == ["s2:0009"]
    assert await gids(store, services=["bank-a", "bank-c"]) == await gids(
        store, services=["bank-c", "bank-a"]
    )
    t = ev.T0
    assert await gids(store, started_after_unix_ms=t + 7 * 60_000) == [
        "s2:0009",
        "s1:zz",
        "s1:0008",
        "s2:0007",
    ]
    assert await gids(store, started_before_unix_ms=t + 60_000) == ["s1:0000"]
    assert await gids(store, ended_before_unix_ms=t + 60_000) == ["s1:0000"]
    assert await gids(store, ended_after_unix_ms=t + 9 * 60_000) == ["s2:0009"]
    assert await gids(store, gid_prefix="s1:000") == [
        "s1:0008",
        "s1:0006",
        "s1:0004",
        "s1:0002",
        "s1:0000",
    ]
    assert await gids(store, idempotency_key_prefix="key-1") == ["s2:0001"]
    assert await gids(store, gid_prefix="nope") == []


async def test_orders(store):
    await _load(store)
    asc = await gids(store, order=pb.QUERY_ORDER_STARTED_ASC)
    assert asc[0] == "s1:0000" and asc == list(reversed(await gids(store)))
    ended = await gids(store, order=pb.QUERY_ORDER_ENDED_DESC)
    assert ended[0] == "s2:0009"  # ended last
    assert set(ended[-2:]) == {"s1:0008", "s1:zz"}  # unfinished last
    longest = await gids(store, order=pb.QUERY_ORDER_DURATION_DESC)
    # The unfinished ones' age so far (minutes) beats any finished duration (ms).
    assert set(longest[:2]) == {"s1:0008", "s1:zz"}
    assert longest[2:5] == ["s2:0009", "s2:0007", "s1:0006"]  # the saga: 500 ms


@pytest.mark.parametrize(
    "order",
    [
        pb.QUERY_ORDER_UNSPECIFIED,
        pb.QUERY_ORDER_STARTED_ASC,
        pb.QUERY_ORDER_ENDED_DESC,
        pb.QUERY_ORDER_DURATION_DESC,
    ],
)
async def test_pages_cover_everything_once(store, order):
    await _load(store)
    # Same created times for several rows: the gid breaks ties.
    await store.apply("s3", [ev.begun(f"s3:{i}", i + 1, shard="s3") for i in range(5)], now_ms=NOW)
    whole = await gids(store, order=order, page_size=100)
    seen: list[str] = []
    token = ""
    for _ in range(20):
        req = pb.QueryListRequest(order=order, page_size=3, page_token=token)
        resp = await list_transactions(store, req, now_ms=NOW if not token else NOW + 5_000)
        seen += [t.gid for t in resp.transactions]
        token = resp.next_page_token
        if not token:
            break
    assert seen == whole and len(seen) == 16


async def test_bad_input(store):
    async def bad(req: pb.QueryListRequest, match: str) -> None:
        with pytest.raises(InvalidArgument, match=match):
            await list_transactions(store, req, now_ms=NOW)

    await bad(pb.QueryListRequest(page_size=1001), "page_size 1001 is over the limit of 1000")
    await bad(pb.QueryListRequest(order=99), "order: unknown value 99")  # type: ignore[arg-type]
    await bad(
        pb.QueryListRequest(filter=pb.TransactionFilter(states=[42])),  # type: ignore[list-item]
        "filter.states: unknown state 42",
    )
    await bad(
        pb.QueryListRequest(filter=pb.TransactionFilter(protocols=[7])),  # type: ignore[list-item]
        "filter.protocols: unknown protocol 7",
    )
    await bad(
        pb.QueryListRequest(filter=pb.TransactionFilter(started_after_unix_ms=-1)),
        "started_after_unix_ms must be >= 0",
    )
    await bad(pb.QueryListRequest(page_token="garbage!"), "not a token this query service made")
    # A real token used with another filter, another order, or edited.
    await _load(store)
    first = await list_transactions(store, pb.QueryListRequest(page_size=2), now_ms=NOW)
    token = first.next_page_token
    assert token
    await bad(
        pb.QueryListRequest(
            page_size=2, page_token=token, filter=pb.TransactionFilter(shards=["s1"])
        ),
        "different filter or order",
    )
    await bad(
        pb.QueryListRequest(page_size=2, page_token=token, order=pb.QUERY_ORDER_STARTED_ASC),
        "different filter or order",
    )
    tampered = token[:-3] + ("AAA" if token[-3:] != "AAA" else "BBB")
    await bad(pb.QueryListRequest(page_size=2, page_token=tampered), "not a token")
    with pytest.raises(InvalidArgument):
        await get_transaction(store, "")
    with pytest.raises(NotFound, match="s9:nope"):
        await get_transaction(store, "s9:nope")
    with pytest.raises(InvalidArgument):
        await stats(store, pb.StatsRequest(since_unix_ms=-5))


async def test_foreign_token_refused(store, tmp_path):
    await _load(store)
    other = SqliteStore(tmp_path / "other.db")
    await other.open()
    try:
        await _load(other)
        token = (
            await list_transactions(other, pb.QueryListRequest(page_size=2), now_ms=NOW)
        ).next_page_token
        with pytest.raises(InvalidArgument, match="not a token"):
            await list_transactions(
                store, pb.QueryListRequest(page_size=2, page_token=token), now_ms=NOW
            )
    finally:
        await other.close()


async def test_stats(store):
    await _load(store)
    out = await stats(store, pb.StatsRequest(since_unix_ms=ev.T0), now_ms=NOW)
    counts = {c.state: c.count for c in out.counts}
    assert counts == {
        pb.TXN_STATE_ACTIVE: 1,
        pb.TXN_STATE_COMMITTING: 1,
        pb.TXN_STATE_COMMITTED: 8,
        pb.TXN_STATE_STUCK: 1,
    }
    overall = [m for m in out.minutes if m.service == ""]
    assert sum(m.started for m in overall) == 11
    assert sum(m.ended for m in overall) == 9
    assert sum(m.committed for m in overall) == 8 and sum(m.aborted for m in overall) == 1
    first = overall[0]
    assert first.minute_unix_ms == ev.T0 and first.p50_ms == 10 and first.p99_ms == 10
    per_b = [m for m in out.minutes if m.service == "bank-b"]
    assert sum(m.started for m in per_b) == 8
    only_c = await stats(store, pb.StatsRequest(service="bank-c", since_unix_ms=ev.T0), now_ms=NOW)
    assert {c.state: c.count for c in only_c.counts} == {pb.TXN_STATE_STUCK: 1}
    assert {m.service for m in only_c.minutes} == {"", "bank-c"}
    assert sum(m.aborted for m in only_c.minutes if m.service == "") == 1


async def test_timeline_in_lsn_order(store):
    events = [
        ev.saga_started("s1:g", 1, [("a", "bank-a")]),
        ev.step("s1:g", 2, 0, pb.BRANCH_STATE_RUNNING),
        ev.step("s1:g", 3, 0, pb.BRANCH_STATE_FAILED, error="boom <b>"),
        ev.saga_state("s1:g", 4, pb.TXN_STATE_COMPENSATED, reason="step a failed"),
    ]
    await store.apply("s1", events[:2], now_ms=NOW)
    await store.apply("s1", events[2:], now_ms=NOW)
    view = await get_transaction(store, "s1:g")
    assert [e.lsn for e in view.timeline] == [1, 2, 3, 4]
    assert view.timeline[2].error == "boom <b>" and view.timeline[2].branch == "a"
    assert view.timeline[3].error == "step a failed"
    assert view.transaction.steps[0].state == pb.BRANCH_STATE_FAILED
    assert view.summary.last_lsn == 4
