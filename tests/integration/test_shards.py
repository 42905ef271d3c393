"""Several coordinator processes, one WAL shard each, found through etcd: the sharded
client spreads new transactions over the shards, sends every call about a gid to the
shard that made it, keeps an idempotency key on one shard, and finds a standby that
took a shard over. Real etcd, real coordinators and banks on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections import Counter

import pytest

from accord.client import AccordClient, Branch, TxnResult
from accord.client._errors import FailedPreconditionError, NotFoundError, UnavailableError
from accord.common.gid import shard_for_key, shard_of
from accord.tools.topology import ManagedProcess
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, balances, open_accounts

pytestmark = pytest.mark.integration

TTL_S = 2
ACCOUNTS = 10
OPENING = 1000


def coordinator(
    cluster: Cluster, cid: str, shard: str, etcd: str, *, standby: bool = False
) -> ManagedProcess:
    return cluster.shard_coordinator(cid, shard, etcd, ttl_s=TTL_S, standby=standby)


async def two_shards(cluster: Cluster) -> tuple[str, dict[str, ManagedProcess], list[str]]:
    """etcd, bank-a and bank-b (registered there), coordinators c1 (shard s1) and c2
    (shard s2); returns etcd's URL, the coordinators, the banks' addresses."""
    etcd = cluster.etcd()
    a = cluster.bank("bank-a", etcd=etcd.url)
    b = cluster.bank("bank-b", etcd=etcd.url)
    await open_accounts(a.address, {f"x{i}": OPENING for i in range(ACCOUNTS)})
    await open_accounts(b.address, {f"y{i}": OPENING for i in range(ACCOUNTS)})
    coords = {"s1": coordinator(cluster, "c1", "s1", etcd.url)}
    coords["s2"] = coordinator(cluster, "c2", "s2", etcd.url)
    return etcd.url, coords, [a.address, b.address]


def transfer(rng: random.Random) -> list[Branch]:
    amount = rng.randint(1, 9)
    return [
        Branch(
            service="bank-a",
            operation="debit",
            payload={"account": f"x{rng.randrange(ACCOUNTS)}", "amount": amount},
        ),
        Branch(
            service="bank-b",
            operation="credit",
            payload={"account": f"y{rng.randrange(ACCOUNTS)}", "amount": amount},
        ),
    ]


async def settled(banks: list[str]) -> int:
    """The banks' total once nothing is held prepared."""
    total = 0
    for address in banks:
        s = await assert_eventually(
            lambda address=address: balances(address),  # type: ignore[misc]
            lambda s: s.prepared_branches == 0,
            timeout_s=20,
            what=f"{address} settled",
        )
        total += s.total
    return total


async def test_the_sharded_client_spreads_load_and_routes_gids(cluster: Cluster) -> None:
    etcd, coords, banks = await two_shards(cluster)
    rng = random.Random(7)
    async with await AccordClient.from_etcd(etcd) as client:
        assert client.shards == {s: p.address for s, p in coords.items()}
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> TxnResult:
            async with sem:
                return await client.execute(transfer(rng), idempotency_key=f"k{i}" if i % 3 else "")

        results = await asyncio.gather(*(one(i) for i in range(120)))
        assert all(r.committed for r in results), [r for r in results if not r.committed][:3]
        by_shard = Counter(shard_of(r.gid) for r in results)
        assert set(by_shard) == {"s1", "s2"} and min(by_shard.values()) >= 30, by_shard

        # Each coordinator holds exactly the transactions of its own shard.
        for shard, proc in coords.items():
            async with AccordClient(proc.address) as direct:
                own, _ = await direct.list(limit=1000)
            assert len(own) == by_shard[shard]
            assert {shard_of(t.gid) for t in own} == {shard}
            assert all(t.state == "COMMITTED" for t in own)
        merged, token = await client.list(limit=1000)
        assert len(merged) == 120 and token == ""
        page, token = await client.list(limit=50)
        rest, last = await client.list(limit=1000, page_token=token)
        assert [t.gid for t in page + rest] == sorted(t.gid for t in merged) and last == ""

        # An idempotency key lands on its shard every time, with the same gid.
        for key in (f"order-{i}" for i in range(1, 9)):
            placed = await client.execute(transfer(rng), idempotency_key=key)
            assert shard_of(placed.gid) == shard_for_key(key, ["s1", "s2"])
        same = transfer(rng)
        first = await client.execute(same, idempotency_key="order-again")
        retry = await client.execute(same, idempotency_key="order-again")
        assert retry.gid == first.gid and retry.committed

        # Interactive: begin on some shard, then every call by gid reaches it.
        gids = []
        for _ in range(4):
            tx = await client.begin()
            for br in transfer(rng):
                await tx.enlist(br)
            gids.append(tx.gid)
        assert {shard_of(g) for g in gids} == {"s1", "s2"}  # round robin
        for gid in gids:
            assert (await client.commit(gid)).committed
            assert (await client.get(gid)).state == "COMMITTED"

        async for seen in client.watch(gids[1]):
            assert seen.gid == gids[1]
        assert seen.state == "COMMITTED"
        # A gid in the older form (no shard): every shard is asked; none knows this one.
        with pytest.raises(NotFoundError, match="asked shards"):
            await client.get("0190c1a2b3c4deadbeef00000001")

        # The command line with --etcd routes by gid too.
        for gid in gids[:2]:
            cli = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "accord.tools.cli", "txn", "get", gid, "--etcd", etcd),
                "--json",
                stdout=subprocess.PIPE,
            )
            stdout, _ = await asyncio.wait_for(cli.communicate(), 60)
            assert cli.returncode == 0
            assert json.loads(stdout)["state"] == "COMMITTED"

        # A gid sent to the wrong coordinator: FAILED_PRECONDITION naming its shard.
        gid = gids[0]
        wrong = coords["s2" if shard_of(gid) == "s1" else "s1"]
        async with AccordClient(wrong.address) as direct:
            with pytest.raises(FailedPreconditionError, match=f"belongs to shard {shard_of(gid)}"):
                await direct.get(gid)
            with pytest.raises(FailedPreconditionError, match="belongs to shard"):
                await direct.commit(gid)

        # accord load --etcd spreads its transactions over both shards too.
        for bank, name in zip(banks, ("bank-a", "bank-b"), strict=True):
            await open_accounts(bank, {f"{name}-{i}": OPENING for i in range(ACCOUNTS)})
        counts = {}
        for shard, proc in coords.items():
            async with AccordClient(proc.address) as direct:
                counts[shard] = len((await direct.list(limit=1000))[0])
        cli = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "accord.tools.cli", "load", "--etcd", etcd, "--json", "-"),
            *("--transactions", "40", "--concurrency", "4", "--accounts", str(ACCOUNTS)),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        stdout, _ = await asyncio.wait_for(cli.communicate(), 120)
        assert cli.returncode == 0 and json.loads(stdout)["errors"] == {}
        for shard, proc in coords.items():
            async with AccordClient(proc.address) as direct:
                own, _ = await direct.list(limit=1000)
            assert len(own) >= counts[shard] + 10, (shard, len(own), counts[shard])

    assert await settled(banks) == 4 * ACCOUNTS * OPENING


async def test_a_standby_takes_a_shard_over_and_the_client_finds_it(cluster: Cluster) -> None:
    etcd, coords, banks = await two_shards(cluster)
    standby = coordinator(cluster, "c1b", "s1", etcd, standby=True)
    rng = random.Random(3)
    results: dict[str, TxnResult] = {}
    unavailable = 0

    async def worker(client: AccordClient, w: int, n: int) -> None:
        nonlocal unavailable
        for i in range(n):
            key, branches = f"w{w}-{i}", transfer(rng)
            deadline = time.monotonic() + 30
            while True:  # what a client does on UNAVAILABLE: retry with the same key
                try:
                    results[key] = await client.execute(branches, idempotency_key=key)
                    break
                except UnavailableError:
                    unavailable += 1
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)

    async with await AccordClient.from_etcd(etcd, timeout_s=15) as client:
        load = asyncio.gather(*(worker(client, w, 60) for w in range(4)))
        await assert_eventually(
            lambda: asyncio.sleep(0, len(results)), lambda n: n >= 60, timeout_s=30
        )
        coords["s1"].kill()
        async with asyncio.timeout(90):
            await load
        assert client.shards == {"s1": standby.address, "s2": coords["s2"].address}
        assert unavailable > 0, "the kill was noticed"

        # Every key on its own shard, on both shards, each decided; the ones in flight
        # at the kill may have aborted (presumed abort), the rest committed.
        assert len(results) == 240
        for key, r in results.items():
            assert shard_of(r.gid) == shard_for_key(key, ["s1", "s2"])
        assert all(r.state in ("COMMITTED", "ABORTED") for r in results.values())
        assert sum(not r.committed for r in results.values()) <= 4
        txns, _ = await client.list(limit=1000)
        assert {t.gid for t in txns} >= {r.gid for r in results.values()}
        assert all(t.state in ("COMMITTED", "ABORTED") for t in txns)
        # Calls by gid of the taken-over shard reach the new owner.
        s1 = next(r for r in results.values() if shard_of(r.gid) == "s1")
        assert (await client.get(s1.gid)).state == s1.state
    assert await settled(banks) == 2 * ACCOUNTS * OPENING
