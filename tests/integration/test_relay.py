"""`accord relay` against a real nats-server with JetStream (Debian's package, `make
nats`), real coordinators (static, or two shards found through a real etcd) and a real
bank: every event of every shard's feed is stored on its subject with its message id,
in LSN order per shard; a relay killed with SIGKILL and restarted loses nothing and
stores nothing twice (the stream's duplicate window is made shorter than the restart,
so a repeat would show); and the choreography example, its services each a process of
their own, ships an order and refunds a failed shipment."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

import accord.v1 as pb
from accord.client import AccordClient, Branch, SagaStep
from accord.client.examples.choreography.shop import checkout
from accord.common.transport import make_channel
from accord.relay import CONTENT_TYPE, MSG_ID, decode, message_id, subject
from accord.tools.topology import ManagedProcess, NatsServer, accord_argv
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, balances, open_accounts

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Stored:
    seq: int
    subject: str
    msg_id: str
    event: pb.FeedEvent


def start_nats(cluster: Cluster) -> NatsServer:
    server = NatsServer(cluster.root / "nats", log_path=cluster.root / "nats.log")
    cluster.topology.start(server)
    return server


def relay_process(cluster: Cluster, url: str, *args: str) -> ManagedProcess:
    argv = accord_argv(["relay", "--nats", url, "--log-level", "info", *args])
    return cluster.topology.process("relay", argv, ready="relay ready")


async def read_stream(url: str, stream: str = "ACCORD") -> list[Stored]:
    """Every message of the stream, in stream order."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            return []
        out: list[Stored] = []
        if not info.state.messages:
            return out
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            headers = msg.headers or {}
            assert msg.data is not None and msg.subject is not None
            event = decode(msg.data, headers.get(CONTENT_TYPE, ""))
            out.append(Stored(seq, msg.subject, headers[MSG_ID], event))
        return out
    finally:
        await nc.close()


async def feed(address: str, *, idle_s: float = 1.0) -> list[pb.FeedEvent]:
    """A coordinator's whole feed, read directly (until it is idle for idle_s)."""
    events: list[pb.FeedEvent] = []
    async with make_channel(address) as channel:
        call = pb.CoordinatorStub(channel).Subscribe(pb.SubscribeRequest(from_lsn=0))
        try:
            while True:
                async with asyncio.timeout(idle_s):
                    resp = await call.read()
                assert resp is not None
                events.extend(resp.events)
        except TimeoutError:
            pass
        finally:
            call.cancel()
    return events


def check_stream(stored: list[Stored], events: list[pb.FeedEvent]) -> None:
    """The stream holds exactly the feed's events, once each, on their subjects, in LSN
    order per shard."""
    ids = Counter(s.msg_id for s in stored)
    assert [i for i, n in ids.items() if n > 1] == [], "duplicates in the stream"
    by_id = {message_id(e): e for e in events}
    assert set(ids) == set(by_id), (
        f"missing {sorted(set(by_id) - set(ids))[:10]}, extra {sorted(set(ids) - set(by_id))[:10]}"
    )
    last: dict[str, int] = {}
    for s in stored:
        assert s.event == by_id[s.msg_id]
        assert s.subject == subject(s.event)
        assert s.event.lsn > last.get(s.event.shard, 0), f"out of LSN order at {s.msg_id}"
        last[s.event.shard] = s.event.lsn


async def until_relayed(url: str, addresses: list[str], timeout_s: float = 60.0) -> list[Stored]:
    """Waits until the stream holds an event for every event of the feeds; returns it."""

    async def probe() -> tuple[list[Stored], set[str]]:
        wanted = set()
        for address in addresses:
            wanted |= {message_id(e) for e in await feed(address, idle_s=0.5)}
        return await read_stream(url), wanted

    stored, _ = await assert_eventually(
        probe,
        lambda r: {s.msg_id for s in r[0]} >= r[1],
        timeout_s=timeout_s,
        what="every feed event in the stream",
    )
    return stored


def transfer(amount: int) -> list[Branch]:
    return [
        Branch(service="bank", operation="debit", payload={"account": "a", "amount": amount}),
        Branch(service="bank", operation="credit", payload={"account": "b", "amount": amount}),
    ]


def trip(amount: int) -> list[SagaStep]:
    """A two-step saga; the second step is refused (and the first compensated) when
    ``amount`` is more than account b holds."""
    return [
        SagaStep(
            name="pay",
            service="bank",
            action="debit",
            compensation="refund",
            payload={"account": "a", "amount": 1},
        ),
        SagaStep(
            name="take",
            service="bank",
            action="debit",
            compensation="refund",
            payload={"account": "b", "amount": amount},
            depends_on=("pay",),
        ),
    ]


_FINAL = (
    pb.TXN_STATE_COMMITTED,
    pb.TXN_STATE_ABORTED,
    pb.TXN_STATE_COMPLETED,
    pb.TXN_STATE_COMPENSATED,
)


async def test_every_state_change_is_published_on_its_subject(cluster: Cluster) -> None:
    bank = cluster.bank("bank")
    await open_accounts(bank.address, {"a": 10_000, "b": 0})
    coord = cluster.coordinator({"bank": bank.address})
    server = start_nats(cluster)
    outcomes: dict[str, str] = {}
    async with AccordClient(coord.address) as client:

        async def workload(n: int) -> None:
            for i in range(n):
                r = await client.execute(transfer(10 if i % 4 else 10**9))  # 1 in 4: no
                outcomes[r.gid] = "2pc.committed" if r.committed else "2pc.aborted"
                s = await client.start_saga(trip(5 if i % 3 else 10**9))  # 1 in 3: undone
                outcomes[s.gid] = "saga.completed" if s.completed else "saga.compensated"

        await workload(6)  # before the relay: it catches up from the start of the log
        relay = relay_process(cluster, server.url, "--coordinator", coord.address)
        cluster.topology.start(relay)
        await workload(6)  # and then live
    assert Counter(outcomes.values()) == {
        "2pc.committed": 8,
        "2pc.aborted": 4,
        "saga.completed": 8,
        "saga.compensated": 4,
    }
    stored = await until_relayed(server.url, [coord.address])
    check_stream(stored, await feed(coord.address))
    final = {s.event.gid: s.subject for s in stored if s.event.state in _FINAL}
    shard = stored[0].event.shard
    assert final == {gid: f"accord.{shard}.{o}" for gid, o in outcomes.items()}
    kinds = Counter(s.subject.split(".", 2)[2] for s in stored)
    assert kinds["2pc.preparing"] == 12 and kinds["saga.running"] > 12
    assert "relay_resume" in relay.output()


async def test_relay_killed_and_restarted_loses_nothing_and_repeats_nothing(
    cluster: Cluster,
) -> None:
    etcd = cluster.etcd()
    bank = cluster.bank("bank", etcd=etcd.url)
    await open_accounts(bank.address, {"a": 1_000_000, "b": 0})
    coords = [cluster.shard_coordinator(f"c{i}", f"s{i}", etcd.url, ttl_s=5) for i in (1, 2)]
    server = start_nats(cluster)
    # The stream made here with a one-second duplicate window: JetStream would store a
    # message published again after the restart below, so none may be.
    nc = await nats.connect(server.url)
    js: JetStreamContext = nc.jetstream()
    await js.add_stream(StreamConfig(name="ACCORD", subjects=["accord.>"], duplicate_window=1.0))
    await nc.close()
    relay = relay_process(
        cluster, server.url, "--etcd", etcd.url, "--format", "json", "--refresh-s", "0.5"
    )
    cluster.topology.start(relay)

    committed = 0

    async def workload(n: int) -> None:
        nonlocal committed
        async with await AccordClient.from_etcd(etcd.url) as client:
            sem = asyncio.Semaphore(8)

            async def one(i: int) -> None:
                nonlocal committed
                async with sem:
                    r = await client.execute(transfer(1), idempotency_key=f"t-{i}")
                    committed += r.committed

            async with asyncio.timeout(120):
                await asyncio.gather(*(one(i) for i in range(n)))

    work = asyncio.create_task(workload(400))
    try:
        await assert_eventually(
            lambda: read_stream(server.url), lambda s: len(s) >= 100, what="100 messages"
        )
        relay.kill()
        killed_at = len(await read_stream(server.url))
        await asyncio.sleep(2.0)  # past the duplicate window
        relay.start()
        await work
    finally:
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
    assert committed == 400

    # Every COMMIT decision (forced to disk before the answer) is in the stream.
    stored = await until_relayed(server.url, [c.address for c in coords])
    decisions = {s.event.gid for s in stored if s.event.kind == pb.FEED_EVENT_KIND_COMMIT}
    assert len(decisions) == 400
    check_stream(stored, [e for c in coords for e in await feed(c.address)])
    # And, once phase two has finished (END records are lazy), every outcome.
    stored = await assert_eventually(
        lambda: until_relayed(server.url, [c.address for c in coords]),
        lambda st: sum(s.event.state == pb.TXN_STATE_COMMITTED for s in st) == 400,
        timeout_s=30,
        what="400 committed outcomes",
    )
    check_stream(stored, [e for c in coords for e in await feed(c.address)])
    assert {s.event.shard for s in stored} == {"s1", "s2"}
    assert len(stored) > killed_at  # the restarted relay went on


def example(cluster: Cluster, name: str, *args: str) -> ManagedProcess:
    module = f"accord.client.examples.choreography.{name}"
    proc = cluster.topology.process(
        name, [sys.executable, "-m", module, *args], ready=f"{name} ready"
    )
    return cluster.topology.start(proc)


async def test_choreography_ships_an_order_and_refunds_a_failed_shipment(
    cluster: Cluster, tmp_path: Path
) -> None:
    bank = cluster.bank("bank")
    await open_accounts(bank.address, {"alice": 100, "shop": 0})
    coord = cluster.coordinator({"bank": bank.address})
    server = start_nats(cluster)
    cluster.topology.start(relay_process(cluster, server.url, "--coordinator", coord.address))
    shipping = example(cluster, "shipping", "--nats", server.url, "--db", str(tmp_path / "s.db"))
    refund = example(cluster, "refund", "--nats", server.url, "--coordinator", coord.address)

    assert await checkout(coord.address, "o-1", "book", 30)
    assert await checkout(coord.address, "o-2", "fragile vase", 20)
    assert not await checkout(coord.address, "o-3", "lamp", 1000)  # refused: never shipped

    async def accounts() -> dict[str, int]:
        resp = await balances(bank.address)
        return {a.id: a.balance for a in resp.accounts}

    # o-1 paid and shipped; o-2 paid, not shippable, refunded by its own 2PC.
    assert await assert_eventually(
        accounts, lambda b: b == {"alice": 70, "shop": 30}, what="o-2 refunded"
    )
    shop = await _shop_events(server.url)
    assert shop == {("shop.shipment.shipped", "o-1"), ("shop.shipment.failed", "o-2")}
    assert "order o-1: shipped" in shipping.output() and "order o-2: failed" in shipping.output()
    assert "order o-2: refunded 20 to alice" in refund.output()
    # The refund is an Accord transaction like any other: the relay published it too.
    stored = await read_stream(server.url)
    assert any(s.event.idempotency_key == "refund-o-2" for s in stored)


async def _shop_events(url: str) -> set[tuple[str, str]]:
    """(subject, order) of every message of the shop's stream."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("SHOP")
        out = set()
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg("SHOP", seq)
            assert msg.data is not None and msg.subject is not None
            out.add((msg.subject, json.loads(msg.data)["order"]))
        return out
    finally:
        await nc.close()
