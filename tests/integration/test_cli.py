"""The `accord` command line against real processes: txn subcommands with --json, exit
codes, health checking and reflection, and `accord demo --json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from accord.participants.trip._service import bookings
from tests.integration.conftest import Cluster, balances, open_accounts

ROOT = Path(__file__).resolve().parents[2]


def accord(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``accord ARGS`` as a program, its stdout and stderr pipes (not a terminal)."""
    proc = subprocess.run(
        [sys.executable, "-m", "accord.tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **env} if env else None,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


async def test_txn_commands(cluster: Cluster) -> None:
    a, b = cluster.bank("bank-a"), cluster.bank("bank-b")
    await open_accounts(a.address, {"x": 50})
    await open_accounts(b.address, {"y": 0})
    coord = cluster.coordinator({"bank-a": a.address, "bank-b": b.address})
    c = ["--coordinator", coord.address]

    gid = json.loads(accord("txn", "begin", *c, "--json").stdout)["gid"]
    out = accord("txn", "enlist", gid, 'bank-a/debit:{"account":"x","amount":20}', *c, "--json")
    assert json.loads(out.stdout)["branch_id"] == "b1"
    accord("txn", "enlist", gid, f'{b.address}/credit:{{"account":"y","amount":20}}', *c)
    committed = json.loads(accord("txn", "commit", gid, *c, "--json").stdout)
    assert committed["state"] == "COMMITTED" and len(committed["branches"]) == 2

    got = json.loads(accord("txn", "get", gid, *c, "--json").stdout)
    assert got["gid"] == gid and got["state"] == "COMMITTED"
    watched = [
        json.loads(line) for line in accord("txn", "watch", gid, *c, "--json").stdout.splitlines()
    ]
    assert watched[-1]["state"] == "COMMITTED"

    # A transfer larger than the balance aborts: exit code 1, reason given.
    big = accord(
        "txn",
        "execute",
        'bank-a/debit:{"account":"x","amount":1000}',
        'bank-b/credit:{"account":"y","amount":1000}',
        *c,
        "--json",
        check=False,
    )
    assert big.returncode == 1
    assert "insufficient" in json.loads(big.stdout)["reason"]

    gid2 = accord("txn", "begin", *c).stdout.strip()
    aborted = json.loads(accord("txn", "abort", gid2, *c, "--reason", "cli test", "--json").stdout)
    assert aborted["state"] == "ABORTED" and aborted["reason"] == "cli test"

    listed = json.loads(accord("txn", "list", *c, "--state", "ABORTED", "--json").stdout)
    assert {t["gid"] for t in listed["transactions"]} >= {gid2}
    assert all(t["state"] == "ABORTED" for t in listed["transactions"])

    missing = accord("txn", "get", "no-such-gid", *c, check=False)
    assert missing.returncode != 0 and "NOT_FOUND" in missing.stderr
    assert (await balances(a.address)).total == 30 and (await balances(b.address)).total == 20

    async with grpc.aio.insecure_channel(coord.address) as ch:
        h = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="accord.v1.Coordinator")
        )
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert "accord.v1.Coordinator" in names


def test_help_and_bad_flags() -> None:
    for cmd in (
        ["--help"],
        ["coordinator", "--help"],
        ["participant", "bank", "--help"],
        ["txn", "--help"],
        ["demo", "--help"],
    ):
        assert accord(*cmd).stdout.strip()
    bad = accord("coordinator", "--service", "no-equals-sign", check=False)
    assert bad.returncode != 0 and "service map" in bad.stderr


def test_demo_json() -> None:
    out = accord("demo", "--json", "--transfers", "60", "--concurrency", "8")
    summary = json.loads(out.stdout)
    assert summary["registry"].startswith("etcd at http://127.0.0.1:"), "etcd by default"
    assert summary["committed"] + summary["aborted"] == 60
    assert summary["committed"] > 0 and summary["aborted"] > 0
    assert summary["total_before"] == summary["total_after"] > 0
    assert summary["errors"] == []


def test_demo_static_json() -> None:
    out = accord("demo", "--json", "--static", "--transfers", "30", "--concurrency", "4")
    summary = json.loads(out.stdout)
    assert summary["registry"] == "static service map"
    assert summary["committed"] + summary["aborted"] == 30
    assert summary["total_before"] == summary["total_after"] > 0


async def test_txn_commands_find_the_coordinator_in_etcd(cluster: Cluster) -> None:
    etcd = cluster.etcd()
    a = cluster.bank("bank-a", etcd=etcd.url)
    b = cluster.bank("bank-b", etcd=etcd.url)
    await open_accounts(a.address, {"x": 50})
    await open_accounts(b.address, {"y": 0})
    cluster.coordinator({}, etcd=etcd.url)
    e = ["--etcd", etcd.url]
    out = accord(
        "txn",
        "execute",
        'bank-a/debit:{"account":"x","amount":5}',
        'bank-b/credit:{"account":"y","amount":5}',
        *e,
        "--json",
    )
    result = json.loads(out.stdout)
    assert result["state"] == "COMMITTED"
    assert {br["address"] for br in result["branches"]} == {a.address, b.address}
    got = json.loads(accord("txn", "get", result["gid"], *e, "--json").stdout)
    assert got["state"] == "COMMITTED"
    # No coordinator registered there: a clear error, non-zero.
    empty = cluster.etcd("etcd-empty")
    bad = accord("txn", "list", "--etcd", empty.url, check=False)
    assert bad.returncode != 0 and "no live coordinator" in bad.stderr


def test_demo_saga_json() -> None:
    out = accord("demo", "--json", "--saga", "--transfers", "20", "--concurrency", "4")
    summary = json.loads(out.stdout)
    sagas = {s["trip"]: s for s in summary["sagas"]}
    assert all(s["consistent"] for s in sagas.values()), sagas
    for s in sagas.values():
        if s["city"] == "Paris":  # the car service refuses Paris: compensated
            assert s["state"] == "COMPENSATED" and s["steps"]["car"] == "FAILED"
            assert s["bookings"]["flight"] == s["bookings"]["hotel"] == "CANCELLED"
        else:
            assert s["state"] == "COMPLETED"
            assert set(s["bookings"].values()) == {"CONFIRMED"}


async def test_txn_saga_from_a_file(cluster: Cluster) -> None:
    a, b = cluster.bank("bank-a"), cluster.bank("bank-b")
    await open_accounts(a.address, {"x": 50})
    await open_accounts(b.address, {"y": 0})
    coord = cluster.coordinator({"bank-a": a.address, "bank-b": b.address})
    c = ["--coordinator", coord.address]
    saga = cluster.root / "saga.json"
    saga.write_text(
        json.dumps(
            {
                "timeout_ms": 20000,
                "steps": [
                    {
                        "name": "take",
                        "service": "bank-a",
                        "action": "debit",
                        "compensation": "refund",
                        "payload": {"account": "x", "amount": 20},
                    },
                    {
                        "name": "give",
                        "service": "bank-b",
                        "action": "credit",
                        "compensation": "uncredit",
                        "payload": {"account": "y", "amount": 20},
                        "depends_on": ["take"],
                        "retry": {"max_attempts": 3, "initial_interval_ms": 10},
                    },
                ],
            }
        )
    )
    done = json.loads(accord("txn", "saga", "--file", str(saga), *c, "--json").stdout)
    assert done["protocol"] == "SAGA" and done["state"] == "COMPLETED"
    assert [s["state"] for s in done["steps"]] == ["SUCCEEDED", "SUCCEEDED"]
    stuck = json.loads(accord("txn", "list", "--stuck", *c, "--json").stdout)
    assert stuck["transactions"] == []
    assert (await balances(a.address)).total == 30 and (await balances(b.address)).total == 20
    bad = cluster.root / "bad.json"
    bad.write_text(
        json.dumps(
            {"steps": [{"name": "a", "service": "bank-a", "action": "debit", "depends_on": ["a"]}]}
        )
    )
    refused = accord("txn", "saga", "--file", str(bad), *c, check=False)
    assert refused.returncode != 0 and "INVALID_ARGUMENT" in refused.stderr


def test_usage_errors_and_help_as_a_program() -> None:
    bad = accord("txn", "list", "--state", "BOGUS", check=False)
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "'BOGUS' is not one of" in bad.stderr
    chaos = accord("chaos", "--help", env={"COLUMNS": "80"}).stdout
    assert "power-loss (" in " ".join(chaos.replace("│", " ").split())


async def test_txn_list_in_a_pipe_prints_whole_ids_one_a_line(cluster: Cluster) -> None:
    a = cluster.bank("bank-a")
    await open_accounts(a.address, {"x": 10})
    coord = cluster.coordinator({"bank-a": a.address})
    c = ["--coordinator", coord.address]
    for amount in (1, 100, 2):  # the 100 aborts: insufficient funds, a long reason
        accord(
            "txn", "execute", f'bank-a/debit:{{"account":"x","amount":{amount}}}', *c, check=False
        )
    listed = json.loads(accord("txn", "list", *c, "--json").stdout)["transactions"]
    assert len(listed) == 3
    plain = accord("txn", "list", *c, env={"COLUMNS": "80"}).stdout.splitlines()
    assert plain[0].split() == ["GID", "STATE", "BRANCHES", "REASON"]
    assert [line.split()[:3] for line in plain[1:]] == [[t["gid"], t["state"], "1"] for t in listed]
    aborted = next(line for line in plain if "ABORTED" in line)
    assert "insufficient" in aborted and "…" not in "".join(plain)


async def test_saga_no_wait_prints_only_the_gid(cluster: Cluster) -> None:
    a = cluster.bank("bank-a")
    await open_accounts(a.address, {"x": 10})
    coord = cluster.coordinator({"bank-a": a.address})
    c = ["--coordinator", coord.address]
    saga = cluster.root / "saga.json"
    saga.write_text(
        json.dumps(
            {
                "steps": [
                    {
                        "name": "take",
                        "service": "bank-a",
                        "action": "debit",
                        "compensation": "refund",
                        "payload": {"account": "x", "amount": 3},
                    }
                ]
            }
        )
    )
    started = accord("txn", "saga", "--file", str(saga), "--no-wait", *c)
    gid = started.stdout.strip()
    assert started.stdout == gid + "\n" and started.stderr == ""
    watched = accord("txn", "watch", gid, *c, "--json").stdout.splitlines()
    assert json.loads(watched[-1])["state"] == "COMPLETED"
    begun = accord("txn", "begin", *c)
    assert begun.stdout.count("\n") == 1 and begun.stdout.strip() == begun.stdout.rstrip("\n")
    assert accord("txn", "abort", begun.stdout.strip(), *c).returncode == 0


async def test_cancel_that_ends_stuck_exits_1_with_the_reason(cluster: Cluster) -> None:
    # The bank stops answering (SIGSTOP) once the coordinator is connected to it: the
    # step's action is sent and never answered, so it may have run and must be
    # compensated, and that compensation gets no answer either. (A service that was
    # never reachable would not do: a step none of whose attempts was sent is
    # UNDELIVERED and needs no compensation.)
    bank = cluster.bank("bank-a")
    await open_accounts(bank.address, {"x": 10})
    coord = cluster.coordinator({"bank-a": bank.address})
    c = ["--coordinator", coord.address]

    def saga_file(name: str, timeout_ms: int) -> str:
        step = {
            "name": "pay",
            "service": "bank-a",
            "action": "credit",
            "compensation": "uncredit",
            "payload": {"account": "x", "amount": 1},
            "timeout_ms": timeout_ms,
            "retry": {"max_attempts": 2, "initial_interval_ms": 100},
        }
        path = cluster.root / name
        path.write_text(json.dumps({"steps": [step]}))
        return str(path)

    warm = accord("txn", "saga", "--file", saga_file("warm.json", 5000), "--wait", *c)
    assert "COMPLETED" in warm.stdout  # the coordinator is connected to the bank now
    bank.pause()
    try:
        gid = accord(
            "txn", "saga", "--file", saga_file("stuck.json", 300), "--no-wait", *c
        ).stdout.strip()
        cancelled = accord("txn", "cancel", gid, *c, "--reason", "changed my mind", check=False)
        assert cancelled.returncode == 1, cancelled.stdout + cancelled.stderr
        assert len(cancelled.stderr.strip().splitlines()) == 1
        assert f"error: saga {gid} cancelled but STUCK, not COMPENSATED" in cancelled.stderr
        assert "accord txn retry" in cancelled.stderr
        assert "STUCK" in cancelled.stdout
        # Still stuck: retry says so the same way.
        retried = accord("txn", "retry", gid, *c, check=False)
        assert retried.returncode == 1 and "retried but STUCK" in retried.stderr
    finally:
        bank.resume()


async def test_an_aborted_idempotency_key_is_noted(cluster: Cluster) -> None:
    a, b = cluster.bank("bank-a"), cluster.bank("bank-b")
    await open_accounts(a.address, {"x": 5})
    await open_accounts(b.address, {"y": 0})
    coord = cluster.coordinator({"bank-a": a.address, "bank-b": b.address})
    c = ["--coordinator", coord.address]
    branches = [
        'bank-a/debit:{"account":"x","amount":9}',
        'bank-b/credit:{"account":"y","amount":9}',
    ]
    note = (
        "note: idempotency key pay-1 now names this aborted transaction; "
        "a new attempt needs a new key"
    )
    first = accord(
        "txn", "execute", *branches, *c, "--idempotency-key", "pay-1", "--json", check=False
    )
    assert first.returncode == 1 and first.stderr.strip() == note
    assert json.loads(first.stdout)["state"] == "ABORTED"
    # The cause fixed (money in), the same key still names the aborted transaction.
    accord("txn", "execute", 'bank-a/credit:{"account":"x","amount":10}', *c)
    again = accord(
        "txn", "execute", *branches, *c, "--idempotency-key", "pay-1", "--json", check=False
    )
    assert again.returncode == 1 and again.stderr.strip() == note
    assert json.loads(again.stdout)["gid"] == json.loads(first.stdout)["gid"]
    # A new key is a new attempt: it commits now, and there is nothing to note.
    fresh = accord("txn", "execute", *branches, *c, "--idempotency-key", "pay-2", "--json")
    assert json.loads(fresh.stdout)["state"] == "COMMITTED" and fresh.stderr == ""


async def test_the_trip_example_saga_file(cluster: Cluster) -> None:
    services = {
        kind: cluster.topology.participant(kind, db=cluster.root / f"{kind}.db").address
        for kind in ("flight", "hotel", "car")
    }
    coord = cluster.coordinator(services)
    example = ROOT / "clients/examples/trip.json"
    out = accord("txn", "saga", "--file", str(example), "--coordinator", coord.address, "--json")
    done = json.loads(out.stdout)
    assert done["state"] == "COMPLETED", done
    assert [s["name"] for s in done["steps"]] == ["flight", "hotel", "car"]
    assert {s["state"] for s in done["steps"]} == {"SUCCEEDED"}
    for kind in services:
        assert bookings(cluster.root / f"{kind}.db") == {"t-42": "CONFIRMED"}
