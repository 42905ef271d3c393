"""Crashes with PostgreSQL banks (issue 13): a participant SIGKILLed after ``PREPARE
TRANSACTION`` and before its vote is sent, after its vote, and during Commit; the
coordinator SIGKILLed at every 2PC failpoint; PostgreSQL itself stopped with ``pg_ctl
stop -m immediate`` while branches are prepared, then restarted; a participant instance
killed for good while another instance of the same service (same database) finishes its
prepared branches. Each ends atomic (committed at both banks or at neither, as the
coordinator decided and the client was told) with the money conserved and nothing left
in ``pg_prepared_xacts``.

One PostgreSQL server for the module (this module stops and restarts it, so it is not
the session's), a database per bank per test. The participant failpoints are
``ACCORD_PARTICIPANT_FAILPOINTS`` (see NEEDS-FROM-PG.md)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from accord.client import AccordClient, AccordClientError, Branch, TxnResult
from accord.participants import Outcome, read_audit
from accord.tools.topology import ManagedProcess, PostgresServer, Topology, free_port
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, balances, open_accounts
from tests.integration.test_crash import FAILPOINTS

pytestmark = pytest.mark.integration

PARTICIPANT_FAILPOINTS = "ACCORD_PARTICIPANT_FAILPOINTS"
_names = itertools.count()


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = PostgresServer(tmp_path_factory.mktemp("pg-crash"), name="pg")
    try:
        server.start()
        yield server
    finally:
        server.remove()


def new_database(pg: PostgresServer, label: str) -> str:
    return pg.create_database(f"{label}_{next(_names)}")


def prepared_gids(url: str) -> list[str]:
    """The prepared transactions PostgreSQL holds in the database at ``url``."""
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        rows = conn.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY gid"
        ).fetchall()
    return [str(r[0]) for r in rows]


def pg_bank(
    topology: Topology,
    name: str,
    url: str,
    *,
    service: str = "",
    port: int = 0,
    env: dict[str, str] | None = None,
    in_doubt_after_s: float = 30.0,
    etcd: str = "",
    accounts: int | None = None,
) -> ManagedProcess:
    """``accord participant bank --db URL``: instance ``name`` of ``service`` (default:
    ``name``); with ``accounts``, seeded at start with accounts ``NAME-0`` ... of 100."""
    return topology.bank(
        name,
        db=url,
        accounts=accounts,
        initial_balance=100 if accounts else None,
        service=service or name,
        port=port,
        in_doubt_after_s=in_doubt_after_s,
        log_level="info",
        env=env,
        etcd=etcd,
        instance_id=name if etcd else "",
        ttl_s=2 if etcd else None,
    )


def transfer(amount: int, src: str = "a", dst: str = "b") -> list[Branch]:
    return [
        Branch(service="bank-a", operation="debit", payload={"account": src, "amount": amount}),
        Branch(service="bank-b", operation="credit", payload={"account": dst, "amount": amount}),
    ]


@dataclass
class Banks:
    """bank-a and bank-b on PostgreSQL, account ``a`` / ``b`` of 100 each (by default)."""

    a: ManagedProcess
    b: ManagedProcess
    a_url: str
    b_url: str

    @property
    def services(self) -> dict[str, str]:
        return {"bank-a": self.a.address, "bank-b": self.b.address}


async def two_banks(
    cluster: Cluster, pg: PostgresServer, *, b_port: int = 0, b_env: dict[str, str] | None = None
) -> Banks:
    a_url, b_url = new_database(pg, "bank_a"), new_database(pg, "bank_b")
    a = pg_bank(cluster.topology, "bank-a", a_url)
    b = pg_bank(cluster.topology, "bank-b", b_url, port=b_port, env=b_env)
    await open_accounts(a.address, {"a": 100})
    await open_accounts(b.address, {"b": 100})
    return Banks(a=a, b=b, a_url=a_url, b_url=b_url)


async def account(address: str, account_id: str) -> int:
    for acc in (await balances(address)).accounts:
        if acc.id == account_id:
            return int(acc.balance)
    raise AssertionError(f"no account {account_id!r} at {address}")


async def settled_outcome(
    a: str, b: str, urls: tuple[str, ...], accounts: tuple[str, str] = ("a", "b")
) -> str:
    """Once neither bank holds a branch prepared (by its own count and by
    ``pg_prepared_xacts``): ``committed`` or ``aborted``, asserting atomicity and that
    the money (100 + 100 at the start, 30 moved) is conserved."""
    for address in (a, b):
        await assert_eventually(
            lambda address=address: balances(address),  # type: ignore[misc]
            lambda r: r.prepared_branches == 0,
            timeout_s=30,
            what=f"no branch prepared at {address}",
        )
    for url in urls:
        await assert_eventually(
            lambda url=url: asyncio.to_thread(prepared_gids, url),  # type: ignore[misc]
            lambda gids: gids == [],
            timeout_s=10,
            what=f"pg_prepared_xacts empty in {url}",
        )
    pair = (await account(a, accounts[0]), await account(b, accounts[1]))
    assert sum(pair) == 200, f"money created or destroyed: {pair}"
    outcome = {(70, 130): "committed", (100, 100): "aborted"}.get(pair)
    assert outcome is not None, f"not atomic: {pair}"
    return outcome


async def final_state(client: AccordClient, gid: str) -> str:
    await assert_eventually(lambda: client.get(gid), lambda t: t.final, what="final state")
    return (await client.get(gid)).state.lower()


def told(result: TxnResult | BaseException) -> str:
    if isinstance(result, BaseException):
        return "unknown"
    return "committed" if result.committed else "aborted"


# ---------------------------------------------------------------- participant crashes


async def test_participant_killed_after_prepare_before_vote(
    cluster: Cluster, pg: PostgresServer
) -> None:
    b_port = free_port()
    env = {PARTICIPANT_FAILPOINTS: "after_pg_prepare=crash"}
    banks = await two_banks(cluster, pg, b_port=b_port, b_env=env)
    coord = cluster.coordinator(banks.services)
    async with AccordClient(coord.address, timeout_s=30) as client:
        task = asyncio.create_task(client.execute(transfer(30), idempotency_key="t1"))
        # bank-b dies between PREPARE TRANSACTION and its answer: PostgreSQL holds the
        # branch prepared, and no vote ever left the process.
        assert await asyncio.to_thread(banks.b.wait, 20) != 0
        assert len(await asyncio.to_thread(prepared_gids, banks.b_url)) == 1
        b2 = pg_bank(cluster.topology, "bank-b", banks.b_url, port=b_port)
        result = await asyncio.gather(task, return_exceptions=True)
        outcome = await settled_outcome(banks.a.address, b2.address, (banks.a_url, banks.b_url))
        retried = await client.execute(transfer(30), idempotency_key="t1")
        assert await final_state(client, retried.gid) == outcome
    if told(result[0]) != "unknown":
        assert told(result[0]) == outcome


async def test_participant_killed_after_its_vote(cluster: Cluster, pg: PostgresServer) -> None:
    """bank-b's account is seeded at start (``--accounts``), so its restart seeds again
    over the row its prepared branch holds locked: it must not wait for it."""
    b_port = free_port()
    a_url, b_url = new_database(pg, "bank_a"), new_database(pg, "bank_b")
    a = pg_bank(cluster.topology, "bank-a", a_url)
    await open_accounts(a.address, {"a": 100})
    b = pg_bank(cluster.topology, "bank-b", b_url, port=b_port, accounts=1)
    banks = Banks(a=a, b=b, a_url=a_url, b_url=b_url)
    # Hold the coordinator between the votes and the decision long enough to kill bank-b.
    coord = cluster.coordinator(
        banks.services, env={"ACCORD_FAILPOINTS": "after_prepare_votes=sleep:1500"}
    )
    async with AccordClient(coord.address, timeout_s=30) as client:
        task = asyncio.create_task(
            client.execute(transfer(30, dst="bank-b-0"), idempotency_key="p1")
        )
        await assert_eventually(
            lambda: asyncio.to_thread(prepared_gids, banks.b_url),
            lambda gids: len(gids) == 1,
            timeout_s=10,
            what="bank-b's branch prepared",
        )
        await assert_eventually(
            lambda: balances(banks.b.address), lambda r: r.prepared_branches == 1, timeout_s=5
        )
        banks.b.kill()  # SIGKILL after its yes vote
        assert len(await asyncio.to_thread(prepared_gids, banks.b_url)) == 1
        b2 = pg_bank(cluster.topology, "bank-b", banks.b_url, port=b_port, accounts=1)
        result = await task
        assert result.committed
        assert await final_state(client, result.gid) == "committed"
    outcome = await settled_outcome(
        banks.a.address, b2.address, (banks.a_url, banks.b_url), ("a", "bank-b-0")
    )
    assert outcome == "committed"


@pytest.mark.parametrize("failpoint", ["before_commit_prepared", "after_commit_prepared"])
async def test_participant_killed_during_commit(
    cluster: Cluster, pg: PostgresServer, failpoint: str
) -> None:
    b_port = free_port()
    env = {PARTICIPANT_FAILPOINTS: f"{failpoint}=crash"}
    banks = await two_banks(cluster, pg, b_port=b_port, b_env=env)
    coord = cluster.coordinator(banks.services)
    async with AccordClient(coord.address, timeout_s=30) as client:
        task = asyncio.create_task(client.execute(transfer(30), idempotency_key="c1"))
        assert await asyncio.to_thread(banks.b.wait, 20) != 0  # died in its Commit
        gids = await asyncio.to_thread(prepared_gids, banks.b_url)
        # Before COMMIT PREPARED the branch is still prepared; after it, it is gone.
        assert len(gids) == (1 if failpoint == "before_commit_prepared" else 0)
        b2 = pg_bank(cluster.topology, "bank-b", banks.b_url, port=b_port)
        result = await asyncio.gather(task, return_exceptions=True)
        outcome = await settled_outcome(banks.a.address, b2.address, (banks.a_url, banks.b_url))
        retried = await client.execute(transfer(30), idempotency_key="c1")
        assert await final_state(client, retried.gid) == "committed"
    assert outcome == "committed"  # the decision was made before any Commit was sent
    if told(result[0]) != "unknown":
        assert told(result[0]) == "committed"


# ---------------------------------------------------------------- coordinator crashes


@dataclass
class SharedBanks:
    banks: Banks
    #: The accounts already used (each case opens its own pair).
    cases: itertools.count[int]


@pytest.fixture(scope="module")
def shared_banks(
    pg: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedBanks]:
    """bank-a and bank-b on PostgreSQL for every coordinator-crash case: each case uses
    its own pair of accounts and its own coordinator and WAL."""
    root = tmp_path_factory.mktemp("pg-shared-banks")
    with Topology(root) as topology:
        a_url, b_url = new_database(pg, "shared_a"), new_database(pg, "shared_b")
        a = pg_bank(topology, "bank-a", a_url)
        b = pg_bank(topology, "bank-b", b_url)
        yield SharedBanks(Banks(a=a, b=b, a_url=a_url, b_url=b_url), itertools.count())


@pytest.mark.parametrize("failpoint", list(FAILPOINTS))
async def test_coordinator_crash_at_each_step(
    cluster: Cluster, shared_banks: SharedBanks, failpoint: str
) -> None:
    banks = shared_banks.banks
    src, dst = f"a-{failpoint}", f"b-{failpoint}"
    await open_accounts(banks.a.address, {src: 100})
    await open_accounts(banks.b.address, {dst: 100})
    branches = transfer(30, src, dst)
    coord = cluster.coordinator(banks.services, env={"ACCORD_FAILPOINTS": f"{failpoint}=crash"})
    port = int(coord.address.rsplit(":", 1)[1])
    result: TxnResult | BaseException
    async with AccordClient(coord.address, timeout_s=15) as client:
        try:
            result = await client.execute(branches, idempotency_key="t1")
        except AccordClientError as e:
            result = e
    assert coord.wait(15) != 0, "the failpoint should have killed the coordinator"
    coord2 = cluster.coordinator(banks.services, port=port)
    async with AccordClient(coord2.address, timeout_s=15) as client:
        retried = await client.execute(branches, idempotency_key="t1")
        final = await final_state(client, retried.gid)
    outcome = await settled_outcome(
        banks.a.address, banks.b.address, (banks.a_url, banks.b_url), (src, dst)
    )
    assert outcome == final == FAILPOINTS[failpoint]
    if told(result) != "unknown":
        assert told(result) == outcome


# ---------------------------------------------------------------- PostgreSQL crashes


@pytest.mark.parametrize("decision", ["committed", "aborted"])
async def test_postgres_immediate_stop_with_branches_prepared(
    cluster: Cluster, pg: PostgresServer, decision: str
) -> None:
    banks = await two_banks(cluster, pg)
    await open_accounts(banks.b.address, {"poor": 0})
    branches = transfer(30)
    if decision == "aborted":
        # A third branch votes no (insufficient funds): the decision is abort, while the
        # other two are held prepared.
        branches.append(
            Branch(service="bank-b", operation="debit", payload={"account": "poor", "amount": 5})
        )
    # Votes in, decision held back long enough to crash and restart PostgreSQL.
    coord = cluster.coordinator(
        banks.services, env={"ACCORD_FAILPOINTS": "after_prepare_votes=sleep:6000"}
    )
    async with AccordClient(coord.address, timeout_s=60) as client:
        task = asyncio.create_task(client.execute(branches, idempotency_key="pg1"))
        urls = (banks.a_url, banks.b_url)
        await assert_eventually(
            lambda: asyncio.gather(*(asyncio.to_thread(prepared_gids, u) for u in urls)),
            lambda held: all(len(g) == 1 for g in held),
            timeout_s=10,
            what="a branch prepared in each bank's database",
        )
        before = [await asyncio.to_thread(prepared_gids, u) for u in urls]
        await asyncio.to_thread(pg.kill)  # pg_ctl stop -m immediate: no checkpoint
        assert not pg.alive()
        await asyncio.to_thread(pg.start)
        # Crash recovery kept them: the same prepared transactions, still undecided.
        assert [await asyncio.to_thread(prepared_gids, u) for u in urls] == before
        assert not task.done()
        result = await task
        assert told(result) == decision
        assert await final_state(client, result.gid) == decision
    outcome = await settled_outcome(banks.a.address, banks.b.address, urls)
    assert outcome == decision
    assert await account(banks.b.address, "poor") == 0


# ---------------------------------------------------------------- one of two instances dies


@pytest.mark.parametrize("finisher", ["resolver", "coordinator"])
async def test_other_instance_finishes_prepared_branches(
    cluster: Cluster, pg: PostgresServer, finisher: str
) -> None:
    """bank-b runs as two instances on one database; the one that prepared the branch is
    killed for good after its vote. ``resolver``: the coordinator knows only the dead
    instance (a static map), and the other one's in-doubt resolver finds the branch in
    ``pg_prepared_xacts``, asks the coordinator and commits it. ``coordinator``: both
    are registered in etcd, and the coordinator's Commit, retried, reaches the live
    instance, which commits what the dead one prepared."""
    a_url, b_url = new_database(pg, "bank_a"), new_database(pg, "bank_b")
    etcd = cluster.etcd().url if finisher == "coordinator" else ""
    a = pg_bank(cluster.topology, "bank-a", a_url, etcd=etcd)
    b1 = pg_bank(cluster.topology, "bank-b1", b_url, service="bank-b", etcd=etcd)
    await open_accounts(a.address, {"a": 100})
    await open_accounts(b1.address, {"b": 100})
    fp = {"ACCORD_FAILPOINTS": "after_prepare_votes=sleep:3000"}
    if etcd:
        coord = cluster.coordinator({}, etcd=etcd, env=fp)
    else:
        coord = cluster.coordinator({"bank-a": a.address, "bank-b": b1.address}, env=fp)
    async with AccordClient(coord.address, timeout_s=60) as client:
        task = asyncio.create_task(client.execute(transfer(30), idempotency_key="i1"))
        await assert_eventually(
            lambda: asyncio.to_thread(prepared_gids, b_url),
            lambda gids: len(gids) == 1,
            timeout_s=10,
            what="bank-b's branch prepared by bank-b1",
        )
        # The second instance comes up (and, with etcd, registers) after the Prepare,
        # so the branch is certainly bank-b1's.
        b2 = pg_bank(
            cluster.topology,
            "bank-b2",
            b_url,
            service="bank-b",
            etcd=etcd,
            in_doubt_after_s=1.0 if finisher == "resolver" else 30.0,
        )
        b1.kill()  # for good
        result = await task
        assert result.committed  # decided before the kill; phase two goes on after
        outcome = await settled_outcome(a.address, b2.address, (a_url, b_url))
        assert outcome == "committed"
        if finisher == "coordinator":
            assert await final_state(client, result.gid) == "committed"
    assert not b1.alive()
    # bank-b's Commit was done by the surviving instance: its audit says by whom.
    commits = [
        row
        for row in await asyncio.to_thread(read_audit, b_url)
        if row.gid == result.gid and row.op == "commit" and row.outcome == Outcome.COMMITTED
    ]
    assert [row.source for row in commits] == [finisher], commits
