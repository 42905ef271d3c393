"""Retiring a shard that is gone for good (``accord shard retire``): two shards, keyed
transactions on both; the one shard's coordinator stops; its keys fail with an
UNAVAILABLE that says what to do; retiring is refused while the shard is owned and
while its WAL holds an unfinished transaction (a coordinator crashed after its commit
decision); once retired, its keys answer their kept outcome with the old gid, new keys
that hashed to it go to the live shard, and ``accord shard list`` shows it retired.
Real etcd, real coordinators and banks on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from accord.client import AccordClient, Branch, TxnResult
from accord.client._errors import AccordClientError, NotFoundError, UnavailableError
from accord.common.gid import shard_for_key, shard_of
from accord.tools.topology import ManagedProcess
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, balances, open_accounts

pytestmark = pytest.mark.integration

TTL_S = 2
ACCOUNTS = 10
OPENING = 1000
SHARDS = ["s1", "s2"]


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


def s1_coordinator(cluster: Cluster, cid: str, etcd: str, env: dict[str, str]) -> ManagedProcess:
    """A coordinator of shard s1 on its WAL directory (``wal-s1``), with ``env``."""
    return cluster.topology.coordinator(
        cid,
        etcd=etcd,
        wal="wal-s1",
        cid=cid,
        shard="s1",
        ttl_s=TTL_S,
        retry_max_s=0.2,
        log_level=None,
        env=env,
    )


async def accord(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "accord.tools.cli", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def wal_files(directory: Path) -> dict[str, str]:
    """Every file of a WAL directory but its LOCK (which holds the locker's pid), hashed."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "LOCK"
    }


async def shard_list(etcd: str) -> dict[str, dict[str, Any]]:
    code, out, err = await accord("shard", "list", "--etcd", etcd, "--json")
    assert code == 0, err
    return {s["shard"]: s for s in json.loads(out)["shards"]}


async def settled(banks: list[str]) -> int:
    total = 0
    for address in banks:
        s = await assert_eventually(
            lambda address=address: balances(address),  # type: ignore[misc]
            lambda s: s.prepared_branches == 0,
            timeout_s=60,
            what=f"{address} settled",
        )
        total += s.total
    return total


async def test_a_retired_shard_keeps_its_keys_and_new_keys_move(cluster: Cluster) -> None:
    etcd_proc = cluster.etcd()
    etcd = etcd_proc.url
    bank_a = cluster.bank("bank-a", etcd=etcd)
    bank_b = cluster.bank("bank-b", etcd=etcd)
    banks = [bank_a.address, bank_b.address]
    await open_accounts(bank_a.address, {f"x{i}": OPENING for i in range(ACCOUNTS)})
    await open_accounts(bank_b.address, {f"y{i}": OPENING for i in range(ACCOUNTS)})
    c1 = cluster.shard_coordinator("c1", "s1", etcd, ttl_s=TTL_S)
    cluster.shard_coordinator("c2", "s2", etcd, ttl_s=TTL_S)
    wal_s1 = str(cluster.root / "wal-s1")
    rng = random.Random(11)

    # Keyed transactions on both shards, and some without a key.
    requests = {f"order-{i}": transfer(rng) for i in range(24)}
    first: dict[str, TxnResult] = {}
    async with await AccordClient.from_etcd(etcd) as client:
        for key, branches in requests.items():
            first[key] = await client.execute(branches, idempotency_key=key)
        keyless = [await client.execute(transfer(rng)) for _ in range(6)]
    assert all(r.committed for r in [*first.values(), *keyless])
    on_s1 = sorted(k for k in requests if shard_for_key(k, SHARDS) == "s1")
    assert len(on_s1) >= 5 and len(on_s1) <= len(requests) - 5, on_s1
    assert all(shard_of(first[k].gid) == "s1" for k in on_s1)
    keyless_s1 = [r.gid for r in keyless if shard_of(r.gid) == "s1"]
    assert keyless_s1

    # Refused while a live coordinator owns the shard.
    code, out, err = await accord("shard", "retire", "s1", "--etcd", etcd, "--wal-dir", wal_s1)
    assert code == 1 and "owned by live coordinator c1" in err, (out, err)
    assert err.count("\n") == 1  # one line

    # A transaction left unfinished: the next owner crashes right after its decision.
    c1.stop()
    crashing = s1_coordinator(
        cluster, "c1b", etcd, {"ACCORD_FAILPOINTS": "after_decision_fsync=crash"}
    )
    in_doubt = next(f"late-{i}" for i in range(1000) if shard_for_key(f"late-{i}", SHARDS) == "s1")
    late = transfer(rng)
    async with await AccordClient.from_etcd(etcd, timeout_s=10) as client:
        with pytest.raises(AccordClientError):
            await client.execute(late, idempotency_key=in_doubt)
    assert crashing.wait(30) != 0
    # The dead owner's lease lapses; then the WAL is what refuses.
    await assert_eventually(
        lambda: shard_list(etcd), lambda m: not m["s1"]["live"], timeout_s=20, what="s1 down"
    )
    code, out, err = await accord("shard", "retire", "s1", "--etcd", etcd, "--wal-dir", wal_s1)
    while code == 1 and "owned by live coordinator" in err:  # the owner key outlives it by a TTL
        await asyncio.sleep(0.5)
        code, out, err = await accord("shard", "retire", "s1", "--etcd", etcd, "--wal-dir", wal_s1)
    assert code == 1, (out, err)
    assert (
        "shard s1 has 1 unfinished transactions: start a coordinator on it to finish them, "
        "then retire it"
    ) in err

    # A coordinator finishes it (the commit decision was durable), and then stops for good.
    finisher = s1_coordinator(cluster, "c1c", etcd, {})
    async with await AccordClient.from_etcd(etcd, timeout_s=30) as client:
        done = await client.execute(late, idempotency_key=in_doubt)
        assert done.committed and shard_of(done.gid) == "s1"
        await assert_eventually(
            lambda: client.get(done.gid), lambda t: t.state == "COMMITTED", timeout_s=30
        )
    first[in_doubt] = done
    requests[in_doubt] = late
    on_s1.append(in_doubt)
    finisher.stop()

    # Without an owner, and not retired: keyed calls say what to do.
    async with await AccordClient.from_etcd(etcd) as client:
        with pytest.raises(UnavailableError) as raised:
            await client.execute(requests[on_s1[0]], idempotency_key=on_s1[0])
    message = str(raised.value)
    assert (
        "no live coordinator owns shard 's1' (last owner c1c, epoch 3): start one "
        f"(accord coordinator --shard s1 --wal-dir ... --etcd {etcd}), or retire the shard "
        f"(accord shard retire s1 --etcd {etcd} --wal-dir ...)"
    ) in message, message
    code, out, err = await accord(
        "txn", "execute", "bank-a/debit", "--etcd", etcd, "--idempotency-key", on_s1[0]
    )
    assert code == 1 and "start one (accord coordinator --shard s1" in err, err

    # Retire it (reading the WAL changes nothing in it); a second run finds it retired.
    before = wal_files(cluster.root / "wal-s1")
    code, out, err = await accord(
        "shard", "retire", "s1", "--etcd", etcd, "--wal-dir", wal_s1, "--json"
    )
    assert code == 0, err
    assert wal_files(cluster.root / "wal-s1") == before
    report = json.loads(out)
    assert report["kept"] == len(on_s1) and report["transactions"] == len(on_s1) + len(keyless_s1)
    assert report["last_owner"] == "c1c" and report["epoch"] == 3 and not report["already_retired"]
    code, out, err = await accord("shard", "retire", "s1", "--etcd", etcd, "--wal-dir", wal_s1)
    assert code == 0 and "retired already" in out, (out, err)
    shards = await shard_list(etcd)
    assert shards["s1"]["retired"]["kept"] == len(on_s1) and not shards["s1"]["live"]
    assert shards["s1"]["owner"] == "c1c" and shards["s1"]["epoch"] == 3
    assert shards["s2"]["live"] and shards["s2"]["retired"] is None

    # No coordinator can own a retired shard again: one line, non-zero, nothing acquired.
    code, out, err = await accord(
        "coordinator",
        "--id",
        "c1d",
        "--shard",
        "s1",
        "--wal-dir",
        wal_s1,
        "--etcd",
        etcd,
        "--listen",
        "127.0.0.1:0",
    )
    assert code == 1 and "Traceback" not in err, (out, err)
    assert "error: " in err and "shard s1 was retired" in err, err
    assert (await shard_list(etcd))["s1"]["epoch"] == 3

    # A new client (nothing cached): old keys answer their kept outcome, with the old gid.
    async with await AccordClient.from_etcd(etcd) as client:
        for key in on_s1:
            again = await client.execute(requests[key], idempotency_key=key)
            assert again.gid == first[key].gid and again.state == "COMMITTED", key
            assert again.idempotency_key == key
            assert (await client.get(first[key].gid)).state == "COMMITTED"
        async for seen in client.watch(first[on_s1[0]].gid):
            assert seen.state == "COMMITTED"
        # Keys of the live shard still go to it, as before.
        for key in (k for k in requests if k not in on_s1):
            again = await client.execute(requests[key], idempotency_key=key)
            assert again.gid == first[key].gid
        # A gid that had no key was not kept.
        with pytest.raises(NotFoundError, match="shard 's1' was retired"):
            await client.get(keyless_s1[0])
        # New keys that hash to s1 go to the next shard of their ranking, and stay there.
        fresh = [f"new-{i}" for i in range(40) if shard_for_key(f"new-{i}", SHARDS) == "s1"][:5]
        for key in fresh:
            branches = transfer(rng)
            r = await client.execute(branches, idempotency_key=key)
            assert r.committed and shard_of(r.gid) == "s2", (key, r.gid)
            assert (await client.execute(branches, idempotency_key=key)).gid == r.gid
        # Keyless ones skip the retired shard.
        for _ in range(4):
            assert shard_of((await client.execute(transfer(rng))).gid) == "s2"

    # The command line, a process of its own, answers an old key from etcd too.
    code, out, err = await accord("txn", "get", first[on_s1[1]].gid, "--etcd", etcd, "--json")
    assert code == 0 and json.loads(out)["state"] == "COMMITTED", err

    assert await settled(banks) == 2 * ACCOUNTS * OPENING
