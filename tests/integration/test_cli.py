"""The `accord` command line against real processes: txn subcommands with --json, exit
codes, health checking and reflection, and `accord demo --json`."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.integration.conftest import Cluster, balances, open_accounts


def accord(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "accord.tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
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
