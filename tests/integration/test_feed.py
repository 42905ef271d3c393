"""The shard's event feed (Coordinator/Subscribe) across real processes: every 2PC and
saga state change in LSN order; resuming after a dropped subscription at any point; a
coordinator SIGKILLed (and its unsynced tail dropped, as a power loss would) while
subscribed; a slow subscriber under load; a subscriber from LSN 0 after checkpoints
removed segments; the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import Sequence

import grpc
import pytest

import accord.v1 as pb
from accord.client import AccordClient, AccordClientError, Branch, SagaStep
from accord.coordinator.wal import drop_unsynced
from accord.coordinator.wal._reader import segments_of
from tests.integration.conftest import Cluster, free_port, open_accounts

K = pb.FeedEventKind


async def take(
    client: AccordClient,
    from_lsn: int,
    *,
    until: int | None = None,
    count: int | None = None,
    timeout_s: float = 30.0,
) -> list[pb.FeedEvent]:
    """Events after ``from_lsn`` until one at or past ``until`` (the durable LSN of the
    first response when neither is given), or ``count`` of them."""
    out: list[pb.FeedEvent] = []
    async with asyncio.timeout(timeout_s):
        async with contextlib.aclosing(client.subscribe(from_lsn)) as feed:
            async for batch in feed:
                if until is None and count is None:
                    until = batch.durable_lsn
                out.extend(batch.events)
                if count is not None and len(out) >= count:
                    return out[:count]
                if until is not None and out and out[-1].lsn >= until:
                    return out
    return out


async def take_all(
    client: AccordClient, from_lsn: int = 0, *, quiet_s: float = 0.5, timeout_s: float = 30.0
) -> list[pb.FeedEvent]:
    """Every event after ``from_lsn`` until the feed is quiet for ``quiet_s`` (records
    written without a sync reach it once synced: at most ~50 ms idle with a subscriber)."""
    out: list[pb.FeedEvent] = []
    async with asyncio.timeout(timeout_s):
        async with contextlib.aclosing(client.subscribe(from_lsn)) as feed:
            while True:
                try:
                    batch = await asyncio.wait_for(anext(feed), quiet_s)
                except TimeoutError:
                    return out
                out.extend(batch.events)


def name(state: int) -> str:
    return pb.TxnState.Name(state).removeprefix("TXN_STATE_")  # type: ignore[arg-type]


def project(events: Sequence[pb.FeedEvent]) -> dict[str, str]:
    """Each transaction's state after the feed (snapshots included)."""
    out: dict[str, str] = {}
    for ev in events:
        if ev.kind == K.FEED_EVENT_KIND_SNAPSHOT:
            out[ev.gid] = name(ev.transaction.state)
        elif ev.gid:
            out[ev.gid] = name(ev.state)
    return out


def assert_ordered(events: Sequence[pb.FeedEvent]) -> None:
    lsns = [ev.lsn for ev in events if ev.kind != K.FEED_EVENT_KIND_SNAPSHOT]
    assert lsns == sorted(lsns) and len(set(lsns)) == len(lsns)


def transfer(amount: int = 1) -> list[Branch]:
    return [
        Branch(service="bank-a", operation="debit", payload={"account": "x", "amount": amount}),
        Branch(service="bank-b", operation="credit", payload={"account": "y", "amount": amount}),
    ]


def saga_step(
    name: str, service: str, action: str, undo: str, account: str, *deps: str
) -> SagaStep:
    return SagaStep(
        name=name,
        service=service,
        action=action,
        compensation=undo,
        payload={"account": account, "amount": 5},
        depends_on=deps,
        max_attempts=2,
        initial_interval_ms=10,
        max_interval_ms=50,
    )


async def two_banks(cluster: Cluster, x: int = 1_000_000) -> dict[str, str]:
    a, b = cluster.bank("bank-a"), cluster.bank("bank-b")
    await open_accounts(a.address, {"x": x, "empty": 0})
    await open_accounts(b.address, {"y": 0})
    return {"bank-a": a.address, "bank-b": b.address}


async def test_every_state_change_in_lsn_order(cluster: Cluster) -> None:
    services = await two_banks(cluster, x=100)
    coord = cluster.coordinator(services)
    async with AccordClient(coord.address) as client:
        committed = await client.execute(transfer(10))
        refused = await client.execute(transfer(1000))  # bank-a votes no
        one_phase = await client.execute(transfer(5)[:1])
        read_only = await client.execute(
            [
                Branch(service="bank-a", operation="balance", payload={"account": "x"}),
                Branch(service="bank-b", operation="balance", payload={"account": "y"}),
            ]
        )
        async with client.transaction() as tx:
            await tx.enlist(transfer(1)[0])
            await tx.enlist(transfer(1)[1])
        interactive = tx.gid
        completed = await client.start_saga(
            [
                saga_step("a", "bank-a", "debit", "refund", "x"),
                saga_step("b", "bank-b", "credit", "uncredit", "y", "a"),
            ]
        )
        compensated = await client.start_saga(
            [
                saga_step("a", "bank-a", "debit", "refund", "x"),
                saga_step("b", "bank-b", "credit", "uncredit", "y", "a"),
                saga_step("c", "bank-a", "debit", "refund", "empty", "b"),
            ]
        )
        assert (committed.state, refused.state, one_phase.state, read_only.state) == (
            "COMMITTED",
            "ABORTED",
            "COMMITTED",
            "COMMITTED",
        )
        assert (completed.state, compensated.state) == ("COMPLETED", "COMPENSATED")
        events = await take_all(client)
        assert_ordered(events)

        def story(gid: str) -> list[tuple[str, str]]:
            return [
                (pb.FeedEventKind.Name(ev.kind).removeprefix("FEED_EVENT_KIND_"), name(ev.state))
                for ev in events
                if ev.gid == gid
            ]

        assert story(committed.gid) == [
            ("PREPARING", "PREPARING"),
            ("COMMIT", "COMMITTING"),
            ("ENDED", "COMMITTED"),
        ]
        assert story(refused.gid) == [
            ("PREPARING", "PREPARING"),
            ("ABORT", "ABORTING"),
            ("ENDED", "ABORTED"),
        ]
        assert story(one_phase.gid) == [("PREPARING", "PREPARING"), ("ENDED", "COMMITTED")]
        assert story(read_only.gid) == [("PREPARING", "PREPARING"), ("ENDED", "COMMITTED")]
        assert story(interactive) == [
            ("BEGUN", "ACTIVE"),
            ("PREPARING", "PREPARING"),
            ("COMMIT", "COMMITTING"),
            ("ENDED", "COMMITTED"),
        ]
        assert story(completed.gid) == [
            ("SAGA_STARTED", "RUNNING"),
            ("STEP", "RUNNING"),
            ("STEP", "RUNNING"),
            ("STEP", "RUNNING"),
            ("STEP", "RUNNING"),
            ("SAGA_STATE", "COMPLETED"),
        ]
        comp = story(compensated.gid)
        assert comp[-1] == ("SAGA_STATE", "COMPENSATED")
        assert ("SAGA_STATE", "COMPENSATING") in comp
        undone = [
            ev.step
            for ev in events
            if ev.gid == compensated.gid and ev.step_status.state == pb.BRANCH_STATE_COMPENSATED
        ]
        assert undone == [1, 0]
        end = next(
            ev for ev in events if ev.gid == committed.gid and ev.kind == K.FEED_EVENT_KIND_ENDED
        )
        assert [b.state for b in end.branches] == [pb.BRANCH_STATE_COMMITTED] * 2
        assert all(b.resolved_address for b in end.branches)
        assert all(ev.unix_ms > 0 for ev in events)
        for gid, state in project(events).items():
            assert (await client.get(gid)).state == state, gid


async def test_resume_at_any_point_equals_one_subscription(cluster: Cluster) -> None:
    coord = cluster.coordinator(await two_banks(cluster))
    async with AccordClient(coord.address) as client:
        await asyncio.gather(*(client.execute(transfer()) for _ in range(30)))
        whole = await take_all(client)
        assert len(whole) >= 90
        for n in (1, 2, 5, 17, 44, len(whole) - 1):
            part = await take(client, 0, count=n)
            resume = part[-1].lsn
            rest = await take(client, resume, until=whole[-1].lsn)
            assert all(ev.lsn > resume for ev in rest)
            union = {ev.lsn: ev for ev in [*part, *rest]}
            assert [union[k] for k in sorted(union)] == whole, n


async def test_sigkill_while_subscribed_loses_nothing_and_sends_nothing_unsynced(
    cluster: Cluster,
) -> None:
    services = await two_banks(cluster)
    extra = ["--wal-sync-marker"]
    coord = cluster.coordinator(services, extra=extra)
    port = int(coord.address.rsplit(":", 1)[1])
    seen: list[pb.FeedEvent] = []
    async with AccordClient(coord.address, timeout_s=5) as client:

        async def subscriber() -> None:
            with contextlib.suppress(AccordClientError):
                async for batch in client.subscribe(0):
                    seen.extend(batch.events)

        async def load() -> None:
            for _ in range(10_000):  # until the coordinator dies
                try:
                    await client.execute(transfer())
                except AccordClientError:
                    return

        sub = asyncio.create_task(subscriber())
        workers = [asyncio.create_task(load()) for _ in range(8)]
        for _ in range(600):  # up to 30 s
            if len(seen) >= 300:
                break
            await asyncio.sleep(0.05)
        coord.kill()  # mid-load, subscribed
        await asyncio.wait_for(asyncio.gather(sub, *workers), 30)
    assert len(seen) >= 300
    # A power loss at that moment: everything not fdatasync'ed is gone.
    dropped = drop_unsynced(cluster.root / "wal")
    coord = cluster.coordinator(services, port=port, extra=extra)
    async with AccordClient(coord.address) as client:
        last = seen[-1].lsn
        whole = {ev.lsn: ev for ev in await take_all(client)}
        assert max(whole) > last  # recovery wrote more after it
        for ev in seen:  # every event sent was a record that survived, unchanged
            assert whole.get(ev.lsn) == ev, (ev.lsn, dropped)
        rest = await take(client, last, until=max(whole))
        assert [ev.lsn for ev in rest] == sorted(k for k in whole if k > last)
        assert_ordered([*seen, *rest])


def scrape(port: int) -> dict[str, float]:
    """The coordinator's accord_feed_* series (name{labels} -> value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("accord_feed_"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def total(series: dict[str, float], prefix: str, label: str = "") -> float:
    return sum(v for k, v in series.items() if k.startswith(prefix) and label in k)


async def test_a_slow_subscriber_does_not_slow_commits_and_catches_up(cluster: Cluster) -> None:
    port = free_port()
    coord = cluster.coordinator(
        await two_banks(cluster), extra=["--metrics-listen", f"127.0.0.1:{port}"]
    )
    # The slow subscriber's own channel, with HTTP/2's fixed 64 KiB window (no BDP
    # probing), so the coordinator's writes to it soon wait and its buffer overflows.
    channel = grpc.aio.insecure_channel(coord.address, options=[("grpc.http2.bdp_probe", 0)])
    async with channel, AccordClient(coord.address) as client:
        await client.execute(transfer())
        edge = (await take_all(client))[-1].lsn
        stream = pb.CoordinatorStub(channel).Subscribe(
            pb.SubscribeRequest(from_lsn=edge, max_batch=16)
        )
        async with contextlib.aclosing(aiter(stream)) as slow:
            # The handshake first; then, at the live edge, it waits for events, takes the
            # first batch, then reads nothing while the load runs.
            hello = await asyncio.wait_for(anext(slow), 10)
            assert hello.shard and not hello.events and hello.durable_lsn >= edge
            pending = asyncio.ensure_future(anext(slow))
            await asyncio.sleep(0.3)
            # Commits go on while it does not read (each within a bounded wait).
            # Small rounds, so that even on a loaded machine (where the group commit
            # batches more) there are more group commits than its buffer holds (64).
            for _ in range(100):
                results = await asyncio.wait_for(
                    asyncio.gather(*(client.execute(transfer()) for _ in range(5))), 30
                )
                assert all(r.committed for r in results)
            got = list((await asyncio.wait_for(pending, 10)).events)
            whole = [ev for ev in await take_all(client) if ev.lsn > edge]
            end = whole[-1].lsn
            async with asyncio.timeout(30):
                async for batch in slow:
                    assert len(batch.events) <= 16
                    got.extend(batch.events)
                    if got and got[-1].lsn >= end:
                        break
        assert got[: len(whole)] == whole
    metrics = await asyncio.to_thread(scrape, port)
    assert total(metrics, "accord_feed_events_total") >= 2 * len(whole)
    assert total(metrics, "accord_feed_catch_ups_total", 'reason="start"') >= 1
    assert total(metrics, "accord_feed_catch_ups_total", 'reason="overflow"') >= 1
    print("feed metrics:", metrics)


async def test_subscriber_from_zero_after_checkpoints_gets_a_snapshot(cluster: Cluster) -> None:
    services = await two_banks(cluster)
    extra = ["--segment-bytes", "16384", "--checkpoint-every", "60"]
    coord = cluster.coordinator(services, extra=extra)
    wal = cluster.root / "wal"
    gids: list[str] = []
    async with AccordClient(coord.address) as client:
        for _ in range(10):
            results = await asyncio.gather(*(client.execute(transfer()) for _ in range(20)))
            gids += [r.gid for r in results]
        refused = await client.execute(transfer(10**9))
        gids.append(refused.gid)
        for _ in range(200):  # a checkpoint removes the first segments (in the background)
            if segments_of(wal)[0] > 1:
                break
            await asyncio.sleep(0.05)
        assert segments_of(wal)[0] > 1, "no segment was removed"
        events = await take_all(client)
        kinds = [ev.kind for ev in events]
        end = kinds.index(K.FEED_EVENT_KIND_SNAPSHOT_END)
        assert end > 0 and set(kinds[:end]) == {K.FEED_EVENT_KIND_SNAPSHOT}
        snap_lsn = events[end].lsn
        assert {ev.lsn for ev in events[: end + 1]} == {snap_lsn}
        assert all(ev.lsn > snap_lsn for ev in events[end + 1 :])
        assert_ordered(events[end + 1 :])
        projected = project(events)
        for gid in gids:
            if gid in projected:
                assert (await client.get(gid)).state == projected[gid], gid
        assert refused.gid in projected


async def test_bad_requests(cluster: Cluster) -> None:
    coord = cluster.coordinator(await two_banks(cluster))
    async with grpc.aio.insecure_channel(coord.address) as channel:
        stub = pb.CoordinatorStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Subscribe(pb.SubscribeRequest(max_batch=5000)):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Subscribe(pb.SubscribeRequest(from_lsn=10**9)):
                pass
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE


async def test_cli_prints_one_event_per_line(cluster: Cluster) -> None:
    coord = cluster.coordinator(await two_banks(cluster))
    async with AccordClient(coord.address) as client:
        done = await client.execute(transfer())
    cmd = [sys.executable, "-m", "accord.tools.cli", "txn", "feed", "-c", coord.address]
    out = await asyncio.to_thread(
        subprocess.run,
        [*cmd, "--from-lsn", "0", "--limit", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [ev["kind"] for ev in lines] == [
        "FEED_EVENT_KIND_PREPARING",
        "FEED_EVENT_KIND_COMMIT",
        "FEED_EVENT_KIND_ENDED",
    ]
    assert {ev["gid"] for ev in lines} == {done.gid}
    text = await asyncio.to_thread(
        subprocess.run,
        [*cmd, "--from-lsn", "1", "--limit", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert [line.split()[1] for line in text.stdout.splitlines()] == ["COMMIT", "ENDED"]
