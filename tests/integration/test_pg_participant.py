"""PostgreSQL participants as real processes: the bank on PostgreSQL behind a real
coordinator (2PC and saga, audit readable offline), in-doubt resolution by another
instance of the service after one is SIGKILLed holding a prepared transaction, the
start-up error lines, ``accord participant pending``, and the README's inventory example
on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from accord.client import AccordClient, AccordClientError, Branch, SagaStep
from accord.client.examples.checkout import checkout
from accord.participants import (
    BranchCall,
    Op,
    ParticipantService,
    PostgresBackend,
    Store,
    read_audit,
)
from accord.participants.bank import bank_app
from accord.participants.bank._logic_pg import bank_app_pg
from accord.tools.topology import ManagedProcess, PostgresServer
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, balances, open_accounts

pytestmark = pytest.mark.integration


def pg_bank(cluster: Cluster, name: str, url: str, **kw: object) -> ManagedProcess:
    return cluster.topology.bank(
        name,
        db=url,
        log_level="info",
        in_doubt_after_s=kw.pop("in_doubt_after_s", 30.0),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def accord(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "accord.tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def transfer(amount: int, src: str = "x", dst: str = "y") -> list[Branch]:
    return [
        Branch(service="bank-a", operation="debit", payload={"account": src, "amount": amount}),
        Branch(service="bank-b", operation="credit", payload={"account": dst, "amount": amount}),
    ]


async def test_bank_on_postgres_behind_a_coordinator(cluster: Cluster, pg_url: str) -> None:
    a = pg_bank(cluster, "bank-a", pg_url)
    b = cluster.bank("bank-b")  # SQLite beside it: one transaction, two kinds of database
    await open_accounts(a.address, {"x": 100})
    await open_accounts(b.address, {"y": 0})
    coord = cluster.coordinator({"bank-a": a.address, "bank-b": b.address})
    async with AccordClient(coord.address, timeout_s=15) as client:
        assert (await client.execute(transfer(30))).committed
        refused = await client.execute(transfer(1000))
        assert not refused.committed and "insufficient funds" in refused.reason
        saga = await client.start_saga(
            [
                SagaStep(
                    name="take",
                    service="bank-a",
                    action="debit",
                    compensation="refund",
                    payload={"account": "x", "amount": 5},
                ),
                SagaStep(
                    name="give",
                    service="bank-b",
                    action="credit",
                    compensation="uncredit",
                    payload={"account": "nobody", "amount": 5},
                    depends_on=("take",),
                ),
            ]
        )
        assert saga.state == "COMPENSATED", saga
    ra = await balances(a.address)
    rb = await balances(b.address)
    assert (ra.total, ra.prepared_branches, rb.total) == (70, 0, 30)
    audit = await asyncio.to_thread(read_audit, pg_url)
    outcomes = {(r.op, r.outcome.value) for r in audit}
    assert {("prepare", "PREPARED"), ("commit", "COMMITTED"), ("prepare", "REFUSED")} <= outcomes
    assert {("execute", "EXECUTED"), ("compensate", "COMPENSATED")} <= outcomes
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        ledger = await (await conn.execute("SELECT delta FROM ledger ORDER BY seq")).fetchall()
    assert [d for (d,) in ledger] == [-30, -5, 5]


@pytest.mark.parametrize(
    ("failpoint", "outcome"), [("after_decision_fsync", "commit"), ("after_prepare_votes", "abort")]
)
async def test_another_instance_resolves_a_killed_instances_prepared_branch(
    cluster: Cluster, pg_url: str, failpoint: str, outcome: str
) -> None:
    # Two instances of bank-a share one PostgreSQL database; the coordinator only knows
    # the first, which is SIGKILLed holding a prepared transaction while the coordinator
    # is down. The second never saw the Prepare: it finds the branch in
    # pg_prepared_xacts, asks the (restarted) coordinator and finishes it.
    a1 = pg_bank(cluster, "bank-a1", pg_url, service="bank-a")
    a2 = pg_bank(cluster, "bank-a2", pg_url, service="bank-a", in_doubt_after_s=1.0)
    b = cluster.bank("bank-b", in_doubt_after_s=1.0)
    await open_accounts(a1.address, {"x": 100})
    await open_accounts(b.address, {"y": 100})
    services = {"bank-a": a1.address, "bank-b": b.address}
    coord = cluster.coordinator(services, env={"ACCORD_FAILPOINTS": f"{failpoint}=crash"})
    port = int(coord.address.rsplit(":", 1)[1])
    async with AccordClient(coord.address, timeout_s=15) as client:
        with contextlib.suppress(AccordClientError):
            await client.execute(transfer(40))
    coord.wait(15)
    a1.kill()
    held = await balances(a2.address)
    assert held.prepared_branches == 1
    if outcome == "abort":
        shutil.rmtree(cluster.root / "wal")  # no decision: presumed abort
    cluster.coordinator(services, port=port)
    ra = await assert_eventually(
        lambda: balances(a2.address),
        lambda r: r.prepared_branches == 0,
        what="bank-a2 resolved bank-a1's branch",
    )
    rb = await assert_eventually(
        lambda: balances(b.address), lambda r: r.prepared_branches == 0, what="bank-b resolved"
    )
    moved = 40 if outcome == "commit" else 0
    assert (ra.total, rb.total) == (100 - moved, 100 + moved)
    audit = await asyncio.to_thread(read_audit, pg_url)
    resolved = [r for r in audit if r.source == "resolver"]
    assert resolved and resolved[0].op == outcome


async def test_startup_errors_are_one_line(tmp_path: Path, postgres_server: PostgresServer) -> None:
    def fails(db: str) -> str:
        proc = accord("participant", "bank", "--listen", "127.0.0.1:0", "--db", db)
        assert proc.returncode != 0, proc.stdout + proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, proc.stderr
        return lines[0]

    zero = PostgresServer(tmp_path / "zero", name="pg-zero", max_prepared_transactions=0)
    try:
        zero.start()
        line = fails(zero.url())
        assert (
            f"PostgreSQL at postgres@127.0.0.1:{zero.port}/postgres has max_prepared_transactions"
            " = 0; set it to at least the number of concurrent branches (e.g. 100) in"
            " postgresql.conf and restart"
        ) in line
    finally:
        zero.remove()
    missing = postgres_server.url("no_such_db")
    assert "the database does not exist" in fails(missing)
    assert "server unreachable" in fails("postgresql://postgres@127.0.0.1:1/x")
    # Bad credentials: a user the server does not know (the test server trusts every
    # known user on loopback, so a wrong password cannot be shown here).
    unknown = f"postgresql://nobody_here@127.0.0.1:{postgres_server.port}/postgres"
    assert "authentication failed (user or password)" in fails(unknown)
    assert "invalid PostgreSQL URL" in fails("postgresql://postgres@127.0.0.1:notaport/x")


async def test_participant_pending(tmp_path: Path, pg_url: str) -> None:
    call = BranchCall(
        gid="s1:0190c1a2b3c4deadbeef00000001",
        branch_id="b1",
        operation="debit",
        payload=b'{"account": "bank-0", "amount": 5}',
        coordinator_address="127.0.0.1:7070",
        shard="s1",
        epoch=1,
    )
    sqlite = ParticipantService(bank_app(seed=[("bank-0", 10)]), Store(tmp_path / "b.db"))
    pg = ParticipantService(bank_app_pg(seed=[("bank-0", 10)]), PostgresBackend(pg_url))
    for svc, db in ((sqlite, str(tmp_path / "b.db")), (pg, pg_url)):
        await svc.open()
        try:
            empty = accord("participant", "pending", "--db", db, "--json")
            assert json.loads(empty.stdout)["pending"] == []
            assert (await svc.call(Op.PREPARE, call)).ok
        finally:
            await svc.close()
        proc = accord("participant", "pending", "--db", db, "--json")
        assert proc.returncode == 0, proc.stderr
        [row] = json.loads(proc.stdout)["pending"]
        assert (row["gid"], row["branch_id"]) == (call.gid, "b1")
        assert row["coordinator_address"] == "127.0.0.1:7070" and row["shard"] == "s1"
        assert row["age_s"] >= 0
        if db == pg_url:
            assert row["transaction"].startswith("accord:")
        table = accord("participant", "pending", "--db", db)
        assert call.gid in table.stdout and "127.0.0.1:7070" in table.stdout
    gone = accord("participant", "pending", "--db", str(tmp_path / "nothing.db"))
    assert gone.returncode != 0 and "no database file" in gone.stderr


async def test_inventory_example_on_postgres(cluster: Cluster, pg_url: str) -> None:
    bank = cluster.bank("bank")
    await open_accounts(bank.address, {"alice": 60})
    inventory = cluster.topology.process(
        "inventory",
        [sys.executable, "-m", "accord.participants.examples.inventory_pg", "127.0.0.1:0", pg_url],
    )
    cluster.topology.start(inventory)
    coord = cluster.coordinator({"bank": bank.address, "inventory": inventory.address})
    assert await checkout(coord.address, "1")
    assert await checkout(coord.address, "1")  # the retry is the same order: paid once
    assert await checkout(coord.address, "2")
    # alice has 10 left: the third order is refused by the bank, and the widget is put
    # back (ROLLBACK PREPARED).
    assert not await checkout(coord.address, "3")
    b = await assert_eventually(lambda: balances(bank.address), lambda r: r.prepared_branches == 0)
    assert b.total == 10

    async def stock() -> tuple[int, int]:
        async with await psycopg.AsyncConnection.connect(pg_url) as conn:
            free = await (await conn.execute("SELECT free FROM stock")).fetchone()
            held = await (
                await conn.execute(
                    "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()"
                )
            ).fetchone()
        assert free is not None and held is not None
        return int(free[0]), int(held[0])

    assert await assert_eventually(stock, lambda s: s == (1, 0))
