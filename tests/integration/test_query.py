"""The read side against real processes: etcd, two coordinator shards, bank participants
and the `accord query` process. The read model is compared with what the coordinators
themselves report (GetTransaction), after the feed's lag is 0; then the query service
is killed mid-feed, a shard changes owner, the model is rebuilt while serving, and the
store is PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

import accord.v1 as pb
from accord.client import AccordClient, Branch, SagaStep, TxnResult
from accord.common.transport import make_channel
from accord.tools.topology import ManagedProcess, accord_argv
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, open_accounts

pytestmark = pytest.mark.integration

TTL_S = 2
ACCOUNTS = 10


def start_query(
    cluster: Cluster,
    db: str,
    *,
    etcd: str = "",
    coordinators: list[str] | None = None,
    name: str = "query",
    start: bool = True,
) -> ManagedProcess:
    args = ["query", "--listen", "127.0.0.1:0", "--db", db, "--http", "127.0.0.1:0"]
    args += ["--log-level", "info", "--id", name]
    if etcd:
        args += ["--etcd", etcd]
    for c in coordinators or ():
        args += ["--coordinator", c]
    proc = cluster.topology.process(name, accord_argv(args))
    if start:
        cluster.topology.start(proc)
    return proc


def run_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(accord_argv(args), capture_output=True, text=True, timeout=60, check=True)


def http_of(proc: ManagedProcess) -> str:
    for line in proc.output().splitlines():
        if line.startswith("http on "):
            return line[len("http on ") :].strip()
    raise AssertionError("no http line:\n" + proc.output())


def healthz(http: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://{http}/healthz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def setup(cluster: Cluster) -> tuple[str, dict[str, ManagedProcess]]:
    etcd = cluster.etcd()
    a = cluster.bank("bank-a", etcd=etcd.url)
    b = cluster.bank("bank-b", etcd=etcd.url)
    await open_accounts(a.address, {f"x{i}": 1000 for i in range(ACCOUNTS)})
    await open_accounts(b.address, {f"y{i}": 1000 for i in range(ACCOUNTS)})
    coords = {
        "s1": cluster.shard_coordinator("c1", "s1", etcd.url, ttl_s=TTL_S),
        "s2": cluster.shard_coordinator("c2", "s2", etcd.url, ttl_s=TTL_S),
    }
    return etcd.url, coords


async def workload(etcd: str, rng: random.Random, n: int, *, sagas: bool = True) -> list[str]:
    """``n`` operations spread over the shards: 2PC transfers (some refused: an amount
    over the balance), and sagas (some compensated: an empty account)."""
    gids = []
    async with await AccordClient.from_etcd(etcd, timeout_s=20) as client:
        for i in range(n):
            x, y = f"x{rng.randrange(ACCOUNTS)}", f"y{rng.randrange(ACCOUNTS)}"
            amount = 5000 if i % 7 == 3 else rng.randint(1, 9)
            if sagas and i % 4 == 1:
                fail = i % 8 == 1
                steps = [
                    SagaStep(
                        name="debit",
                        service="bank-a",
                        action="debit",
                        compensation="refund",
                        payload={"account": x, "amount": 3},
                    ),
                    SagaStep(
                        name="credit",
                        service="bank-b",
                        action="debit" if fail else "credit",
                        compensation="refund" if fail else "uncredit",
                        payload={"account": "missing" if fail else y, "amount": 3},
                        depends_on=("debit",),
                    ),
                ]
                res = await client.start_saga(steps, wait=True)
            elif i % 5 == 2:
                res = await client.execute(
                    [
                        Branch(
                            service="bank-a",
                            operation="credit",
                            payload={"account": x, "amount": 1},
                        )
                    ]
                )  # one branch: the one-phase optimisation
            else:
                res = await client.execute(
                    [
                        Branch(
                            service="bank-a",
                            operation="debit",
                            payload={"account": x, "amount": amount},
                        ),
                        Branch(
                            service="bank-b",
                            operation="credit",
                            payload={"account": y, "amount": amount},
                        ),
                    ],
                    idempotency_key=f"k-{rng.random()}",
                )
            gids.append(res.gid)
    return gids


async def query_call(address: str, method: str, request: Any) -> Any:
    async with make_channel(address) as channel:
        return await getattr(pb.QueryStub(channel), method)(request, timeout=10)


async def list_all(address: str, **filter_kw: Any) -> list[pb.TransactionSummary]:
    out: list[pb.TransactionSummary] = []
    token = ""
    order = filter_kw.pop("order", 0)
    for _ in range(1000):
        resp = await query_call(
            address,
            "ListTransactions",
            pb.QueryListRequest(
                filter=pb.TransactionFilter(**filter_kw),
                order=order,
                page_size=7,
                page_token=token,
            ),
        )
        out += resp.transactions
        token = resp.next_page_token
        if not token:
            return out
    raise AssertionError("too many pages")


async def lags(address: str) -> list[pb.ShardLag]:
    return list((await query_call(address, "Stats", pb.StatsRequest())).shards)


async def wait_caught_up(address: str, shards: int = 2, timeout_s: float = 30.0) -> None:
    def done(got: list[pb.ShardLag]) -> bool:
        return len(got) == shards and all(
            s.connected and s.applied_lsn == s.durable_lsn and s.lag_events == 0 for s in got
        )

    await assert_eventually(
        lambda: lags(address), done, timeout_s=timeout_s, what="lag 0 on every shard"
    )


async def coordinator_view(etcd: str, gids: list[str]) -> dict[str, TxnResult]:
    out = {}
    async with await AccordClient.from_etcd(etcd, timeout_s=20) as client:
        for gid in gids:
            t = await client.get(gid)
            out[gid] = t
    return out


def differences(model: dict[str, pb.TransactionSummary], coord: dict[str, Any]) -> list[str]:
    out = [f"{g}: not in the read model" for g in set(coord) - set(model)]
    out += [f"{g}: not at the coordinators" for g in set(model) - set(coord)]
    for gid, c in coord.items():
        s = model.get(gid)
        if s is None:
            continue
        seen = (
            pb.TxnState.Name(s.state).removeprefix("TXN_STATE_"),
            s.reason,
            s.branches,
            s.idempotency_key,
        )
        want = (str(c.state), c.reason, len(c.branches) + len(c.steps), c.idempotency_key)
        if seen != want:
            out.append(f"{gid}: read model {seen}, coordinator {want}")
    return out


async def converged(address: str, etcd: str, gids: list[str], timeout_s: float = 30.0) -> None:
    """The read model equals the coordinators' own view of ``gids`` (and holds nothing
    else). The coordinators are asked again on each try: an END record is lazy, so a
    transaction may still move on after its client got the outcome."""

    async def probe() -> list[str]:
        coord = await coordinator_view(etcd, gids)
        return differences({t.gid: t for t in await list_all(address)}, coord)

    await assert_eventually(probe, lambda d: not d, timeout_s=timeout_s, what="read model")


def check_same(model: dict[str, pb.TransactionSummary], coord: dict[str, Any]) -> None:
    assert not differences(model, coord)


async def test_read_model_equals_the_coordinators_view(cluster: Cluster, tmp_path: Path) -> None:
    etcd, _ = await setup(cluster)
    q = start_query(cluster, str(tmp_path / "query.db"), etcd=etcd)
    gids = await workload(etcd, random.Random(1), 40)
    await wait_caught_up(q.address)
    listed = await list_all(q.address)
    model = {t.gid: t for t in listed}
    assert len(listed) == len(model) == 40  # every page, each once
    await converged(q.address, etcd, gids)
    listed = await list_all(q.address)
    by_state = {t.gid: t.state for t in listed}
    assert pb.TXN_STATE_ABORTED in by_state.values()
    assert pb.TXN_STATE_COMPENSATED in by_state.values()
    # Filters over real data agree with the unfiltered list.
    filters: list[tuple[dict[str, Any], Callable[[pb.TransactionSummary], bool]]] = [
        ({"states": [pb.TXN_STATE_COMMITTED]}, lambda t: t.state == pb.TXN_STATE_COMMITTED),
        ({"protocols": [pb.PROTOCOL_SAGA]}, lambda t: t.protocol == pb.PROTOCOL_SAGA),
        ({"shards": ["s2"]}, lambda t: t.shard == "s2"),
        ({"services": ["bank-b"]}, lambda t: "bank-b" in t.services),
        ({"gid_prefix": "s1:"}, lambda t: t.gid.startswith("s1:")),
        ({"idempotency_key_prefix": "k-"}, lambda t: t.idempotency_key.startswith("k-")),
    ]
    for kw, pred in filters:
        got = {t.gid for t in await list_all(q.address, **kw)}
        assert got == {t.gid for t in listed if pred(t)}, kw
        assert got, kw
    newest = await list_all(q.address)
    oldest = await list_all(q.address, order=pb.QUERY_ORDER_STARTED_ASC)
    assert [t.gid for t in oldest] == [t.gid for t in reversed(newest)]
    # One transaction's timeline, in LSN order, and its current state.
    view = await query_call(q.address, "GetTransaction", pb.QueryGetRequest(gid=gids[0]))
    lsns = [e.lsn for e in view.timeline]
    assert lsns == sorted(set(lsns)) and len(lsns) >= 2
    assert view.timeline[-1].state == view.summary.state == view.transaction.state
    # Bad input.
    for req, what in [
        (pb.QueryListRequest(page_size=5000), "page_size"),
        (pb.QueryListRequest(page_token="nope"), "page_token"),
        (pb.QueryListRequest(filter=pb.TransactionFilter(states=[77])), "unknown state"),  # type: ignore[list-item]
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await query_call(q.address, "ListTransactions", req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and what in (
            err.value.details() or ""
        )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await query_call(q.address, "GetTransaction", pb.QueryGetRequest(gid="s1:ffff"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # Stats and /healthz.
    stats = await query_call(q.address, "Stats", pb.StatsRequest())
    assert sum(c.count for c in stats.counts) == 40
    assert sum(m.started for m in stats.minutes if m.service == "") == 40
    assert {s.shard for s in stats.shards} == {"s1", "s2"}
    status, body = healthz(http_of(q))
    assert status == 200 and body["healthy"], body
    assert {s["shard"] for s in body["shards"]} == {"s1", "s2"}
    # The CLI reads from the query service with --query.
    out = await asyncio.to_thread(
        run_cli, ["txn", "list", "--query", q.address, "--json", "--limit", "1000"]
    )
    assert {t["gid"] for t in json.loads(out.stdout)["transactions"]} == set(gids)
    out = await asyncio.to_thread(run_cli, ["txn", "get", gids[0], "--query", q.address, "--json"])
    assert json.loads(out.stdout)["summary"]["gid"] == gids[0]
    # Registered in etcd under /accord/v1/query/<id>.
    from accord.registry import Etcd

    async with Etcd(etcd) as client:
        kv = client.client.kv
        assert kv is not None
        got = await kv.get("/accord/v1/query/query")
        value = json.loads(got.kvs[0].value)
        assert value == {"address": q.address, "http": http_of(q)}


async def timelines(address: str) -> dict[str, list[tuple[int, int, int]]]:
    out = {}
    for t in await list_all(address):
        view = await query_call(address, "GetTransaction", pb.QueryGetRequest(gid=t.gid))
        out[t.gid] = [(e.lsn, e.kind, e.state) for e in view.timeline]
    return out


async def test_kill_9_mid_feed_then_resume_from_stored_lsn(
    cluster: Cluster, tmp_path: Path
) -> None:
    etcd, _ = await setup(cluster)
    db = str(tmp_path / "query.db")
    q = start_query(cluster, db, etcd=etcd)
    load = asyncio.create_task(workload(etcd, random.Random(2), 60))
    try:
        for _ in range(3):  # killed three times while the feed flows
            await asyncio.sleep(1.0)
            q.kill()
            q.start()
    finally:
        gids = await load
    await wait_caught_up(q.address)
    await converged(q.address, etcd, gids)
    crashed = await timelines(q.address)
    # A read model built in one go from LSN 0 has exactly the same timelines: nothing
    # applied twice, nothing missing.
    fresh = start_query(cluster, str(tmp_path / "fresh.db"), etcd=etcd, name="fresh")
    await wait_caught_up(fresh.address)
    await converged(fresh.address, etcd, gids)
    assert await timelines(fresh.address) == crashed


async def test_follows_the_standby_that_takes_a_shard_over(
    cluster: Cluster, tmp_path: Path
) -> None:
    etcd, coords = await setup(cluster)
    standby = cluster.shard_coordinator("c1b", "s1", etcd, ttl_s=TTL_S, standby=True)
    q = start_query(cluster, str(tmp_path / "query.db"), etcd=etcd)
    before = await workload(etcd, random.Random(3), 10, sagas=False)
    await wait_caught_up(q.address)
    coords["s1"].kill()
    await assert_eventually(
        lambda: asyncio.to_thread(lambda: "listening on" in standby.output()),
        bool,
        timeout_s=30,
        what="the standby serves",
    )

    async def owner() -> str:
        stats = await query_call(q.address, "Stats", pb.StatsRequest())
        return next((s.coordinator for s in stats.shards if s.shard == "s1"), "")

    await assert_eventually(owner, lambda a: a == standby.address, timeout_s=30, what="new owner")
    after = await workload(etcd, random.Random(4), 10, sagas=False)
    await wait_caught_up(q.address)
    # Transactions cut by the kill are finished by the new owner; all are seen.
    await converged(q.address, etcd, before + after)
    assert any(g.startswith("s1:") for g in after)


async def test_rebuild_while_serving(cluster: Cluster, tmp_path: Path) -> None:
    etcd, coords = await setup(cluster)
    q = start_query(cluster, str(tmp_path / "query.db"), etcd=etcd)
    gids = await workload(etcd, random.Random(5), 30)
    await wait_caught_up(q.address)
    await converged(q.address, etcd, gids)
    before = await timelines(q.address)
    reads = 0
    stop = asyncio.Event()

    async def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            resp = await query_call(q.address, "ListTransactions", pb.QueryListRequest())
            assert len(resp.transactions) == 30
            reads += 1

    task = asyncio.create_task(reader())
    proc = await asyncio.to_thread(
        subprocess.run,
        accord_argv(["query", "rebuild", "--http", http_of(q), "--json"]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    stop.set()
    await task
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["transactions"] == 30
    assert reads > 0  # the old model answered while the new one was built
    more = await workload(etcd, random.Random(6), 5)
    await wait_caught_up(q.address)
    await converged(q.address, etcd, gids + more)
    after = await timelines(q.address)
    assert {g: after[g] for g in before} == before
    # Offline: no service on the store, --db and the coordinators' addresses.
    q.stop()
    offline = await asyncio.to_thread(
        subprocess.run,
        accord_argv(
            [
                "query",
                "rebuild",
                "--db",
                str(tmp_path / "query.db"),
                "-c",
                coords["s1"].address,
                "-c",
                coords["s2"].address,
                "--json",
            ]
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["transactions"] == 35


async def test_postgresql_store(cluster: Cluster, tmp_path: Path, pg_url: str) -> None:
    etcd, _ = await setup(cluster)
    q = start_query(cluster, pg_url, etcd=etcd)
    gids = await workload(etcd, random.Random(7), 20)
    await wait_caught_up(q.address)
    await converged(q.address, etcd, gids)
    assert {t.gid for t in await list_all(q.address, gid_prefix="s2:")} == {
        g for g in gids if g.startswith("s2:")
    }
    stats = await query_call(q.address, "Stats", pb.StatsRequest())
    assert sum(c.count for c in stats.counts) == 20
    # Killed and restarted on the same database: resumes from the stored LSNs.
    q.kill()
    more = await workload(etcd, random.Random(8), 5)
    q.start()
    await wait_caught_up(q.address)
    await converged(q.address, etcd, gids + more)


async def test_static_coordinators_learn_their_shard(cluster: Cluster, tmp_path: Path) -> None:
    etcd, coords = await setup(cluster)
    gids = await workload(etcd, random.Random(9), 12, sagas=False)
    # One address with its shard named, one learned from the feed's first event.
    q = start_query(
        cluster,
        str(tmp_path / "q.db"),
        coordinators=[coords["s1"].address, f"s2={coords['s2'].address}"],
    )
    await wait_caught_up(q.address)
    await converged(q.address, etcd, gids)


@pytest.mark.timeout(300)
async def test_chaos_with_query_finds_no_difference(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = await asyncio.to_thread(
        subprocess.run,
        accord_argv(
            [
                "chaos",
                "--query",
                *("--duration", "8"),
                *("--seed", "14"),
                *("--coordinators", "2"),
                *("--participants", "2"),
                *("--fault-every", "5"),
                *("--faults", "kill-coordinator,kill-participant"),
                *("--out", str(out)),
                "--json",
            ]
        ),
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["violations"] == []
    rm = report["read_model"]
    # Every transaction the coordinators hold was compared, and the model has them all.
    assert rm["compared"] > 50 and rm["read_model"] >= rm["compared"]
    assert report["coordinator_kills"] + report["participant_kills"] >= 1
