"""The Node.js participant (participants/examples/node) and client (clients/examples/node)
in real transactions with the Python bank: a mixed 2PC through a coordinator SIGKILL and
restart (money conserved across both, no branch left prepared), a mixed saga whose second
step is refused (the first compensated), the Node client's 2PC and saga, and the Node
participant's restart with a branch held prepared."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc import aio

import accord.v1 as pb
from accord.client import AccordClient, AccordClientError, Branch, SagaStep
from accord.tools.topology import ManagedProcess, accord_argv
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, balances, open_accounts

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NODE_PARTICIPANT = ROOT / "participants" / "examples" / "node"
NODE_CLIENT = ROOT / "clients" / "examples" / "node"
NODE = shutil.which("node")


@pytest.fixture(autouse=True)
def node_modules() -> None:
    # `make test` installs node and npm (make node-examples): their absence is a failure.
    if NODE is None:
        pytest.fail("node is not installed: run make node-examples (the examples need Node 20)")
    for folder in (NODE_PARTICIPANT, NODE_CLIENT):
        if not (folder / "node_modules").is_dir():
            pytest.fail(
                f"{folder.relative_to(ROOT)}/node_modules is missing: run make node-examples"
            )


def node_participant(
    cluster: Cluster, name: str, accounts: dict[str, int], port: int = 0
) -> ManagedProcess:
    seed = ",".join(f"{k}={v}" for k, v in accounts.items())
    argv = [
        str(NODE),
        str(NODE_PARTICIPANT / "participant.mjs"),
        *("--listen", f"127.0.0.1:{port}"),
        *("--db", str(cluster.root / f"{name}.db")),
        *(["--accounts", seed] if seed else []),
    ]
    return cluster.topology.start(cluster.topology.process(name, argv))


def node_state(cluster: Cluster, name: str) -> tuple[dict[str, tuple[int, int]], int]:
    """The Node participant's accounts (balance, held) and branches held prepared, read
    from its SQLite file (WAL mode: a reader beside the writer)."""
    with sqlite3.connect(f"file:{cluster.root / name}.db?mode=ro", uri=True) as conn:
        accounts = {
            r[0]: (int(r[1]), int(r[2]))
            for r in conn.execute("SELECT id, balance, held FROM accounts ORDER BY id")
        }
        prepared = conn.execute(
            "SELECT count(*) FROM accord_branches WHERE state = 'PREPARED'"
        ).fetchone()[0]
    return accounts, int(prepared)


async def test_mixed_2pc_through_a_coordinator_sigkill(cluster: Cluster) -> None:
    py = cluster.bank("py-bank")
    await open_accounts(py.address, {"p": 1000})
    nd = node_participant(cluster, "node-bank", {"n": 1000})
    services = {"py-bank": py.address, "node-bank": nd.address}
    coord = cluster.coordinator(services)
    port = int(coord.address.rsplit(":", 1)[1])

    def transfer(i: int) -> list[Branch]:
        # Alternate directions; every 7th asks more than any balance holds (a no vote).
        amount = 5000 if i % 7 == 6 else 1 + i % 9
        src, dst = (("py-bank", "p"), ("node-bank", "n"))[:: 1 if i % 2 else -1]
        return [
            Branch(
                service=src[0], operation="debit", payload={"account": src[1], "amount": amount}
            ),
            Branch(
                service=dst[0], operation="credit", payload={"account": dst[1], "amount": amount}
            ),
        ]

    n = 60
    told: dict[int, str] = {}

    async def worker(client: AccordClient, ids: list[int]) -> None:
        for i in ids:
            try:
                r = await client.execute(transfer(i), idempotency_key=f"t{i}")
                told[i] = r.state
            except AccordClientError:
                return  # the coordinator died: the rest is retried after the restart

    async with AccordClient(coord.address, timeout_s=10) as client:
        tasks = [asyncio.create_task(worker(client, list(range(w, n, 4)))) for w in range(4)]

        async def done() -> int:
            return len(told)

        await assert_eventually(done, lambda k: k >= n // 3, what="a third done")
        coord.kill()  # SIGKILL mid-run, transactions in flight
        await asyncio.gather(*tasks)
    assert len(told) < n, "the coordinator died after everything was done"
    coord2 = cluster.coordinator(services, port=port)
    async with AccordClient(coord2.address, timeout_s=20) as client:
        for i in range(n):  # every transfer once more with its key: the recorded outcome
            r = await client.execute(transfer(i), idempotency_key=f"t{i}")
            if i in told and told[i] in ("COMMITTED", "ABORTED"):
                assert r.state == told[i], f"transfer {i}: told {told[i]}, now {r.state}"
            gid = r.gid
            final = await assert_eventually(
                lambda: client.get(gid),  # noqa: B023 (awaited here, in this iteration)
                lambda t: t.final,
                what=f"t{i}",
            )
            told[i] = final.state
    committed = [i for i in range(n) if told[i] == "COMMITTED"]
    assert all(told[i] == "ABORTED" for i in range(n) if i % 7 == 6)
    assert len(committed) >= n // 2

    pb_ = await assert_eventually(
        lambda: balances(py.address), lambda r: r.prepared_branches == 0, what="py settled"
    )
    nodes = await assert_eventually(
        lambda: asyncio.to_thread(node_state, cluster, "node-bank"),
        lambda s: s[1] == 0,
        what="node settled",
    )
    (n_balance, n_held) = nodes[0]["n"]
    assert n_held == 0 and pb_.total + n_balance == 2000, "money created or destroyed"
    # Each committed transfer moved its amount; the aborted ones nothing.
    net = sum((1 if i % 2 else -1) * (1 + i % 9) for i in committed)
    assert n_balance == 1000 + net


async def test_mixed_saga_compensates_the_first_step(cluster: Cluster) -> None:
    py = cluster.bank("py-bank")
    await open_accounts(py.address, {"p": 100})
    nd = node_participant(cluster, "node-bank", {"n": 20})
    # Unary RPCs here (the other tests use the default, Stream to both participants).
    coord = cluster.coordinator(
        {"py-bank": py.address, "node-bank": nd.address},
        extra=["--participant-transport", "unary"],
    )
    steps = [
        # Node takes 50 from n (which has 20): refused, nothing to undo; Python's credit
        # ran first and is compensated (uncredit).
        SagaStep(
            name="give",
            service="py-bank",
            action="credit",
            compensation="uncredit",
            payload={"account": "p", "amount": 50},
        ),
        SagaStep(
            name="take",
            service="node-bank",
            action="debit",
            compensation="refund",
            payload={"account": "n", "amount": 50},
            depends_on=("give",),
        ),
    ]
    ok_steps = [
        SagaStep(
            name="take",
            service="node-bank",
            action="debit",
            compensation="refund",
            payload={"account": "n", "amount": 15},
        ),
        SagaStep(
            name="give",
            service="py-bank",
            action="credit",
            compensation="uncredit",
            payload={"account": "p", "amount": 15},
            depends_on=("take",),
        ),
    ]
    async with AccordClient(coord.address, timeout_s=20) as client:
        r = await client.start_saga(steps, idempotency_key="s1")
        assert r.state == "COMPENSATED", r
        states = {s.name: s.state for s in r.steps}
        assert states == {"give": "COMPENSATED", "take": "FAILED"}, states
        assert "insufficient funds" in next(s.last_error for s in r.steps if s.name == "take")
        assert (await balances(py.address)).total == 100
        assert node_state(cluster, "node-bank")[0] == {"n": (20, 0)}
        # And a saga that completes across both.
        r = await client.start_saga(ok_steps, idempotency_key="s2")
        assert r.state == "COMPLETED", r
    assert (await balances(py.address)).total == 115
    assert node_state(cluster, "node-bank")[0] == {"n": (5, 0)}


async def test_node_client_runs_a_2pc_and_a_saga(cluster: Cluster) -> None:
    py = cluster.bank("py-bank")
    await open_accounts(py.address, {"b": 100})
    nd = node_participant(cluster, "node-bank", {"a": 100})
    coord = cluster.coordinator({"py-bank": py.address, "node-bank": nd.address})

    def client(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(NODE), str(NODE_CLIENT / "client.mjs"), coord.address, *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)

    out = client("node-bank", "py-bank", "--amount", "30", "--key", "k1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("2pc ") and lines[0].split()[2] == "COMMITTED", lines
    assert lines[1].split()[2:] == ["COMPLETED", "take=SUCCEEDED", "give=SUCCEEDED"], lines
    assert node_state(cluster, "node-bank")[0] == {"a": (40, 0)}
    assert (await balances(py.address)).total == 160
    # Too much for the saga: its first step is refused, nothing to compensate; the 2PC
    # (10) commits.
    out = client("node-bank", "py-bank", "--amount", "10", "--saga-amount", "500", "--key", "k2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[2] == "COMMITTED", lines
    assert lines[1].split()[2:] == ["COMPENSATED", "take=FAILED", "give=SKIPPED"], lines
    assert node_state(cluster, "node-bank")[0] == {"a": (30, 0)}


async def test_node_participant_keeps_a_prepared_branch_across_sigkill(cluster: Cluster) -> None:
    nd = node_participant(cluster, "node-bank", {"a": 100})

    def req(op: str, amount: int, **kw: object) -> pb.BranchRequest:
        payload = json.dumps({"account": "a", "amount": amount}).encode()
        return pb.BranchRequest(gid="g1", branch_id="b1", operation=op, payload=payload, **kw)  # type: ignore[arg-type]

    async with aio.insecure_channel(nd.address) as channel:
        stub = pb.ParticipantStub(channel)
        assert (await stub.Prepare(req("debit", 40, shard="s", epoch=3))).message == "prepared"
    nd.kill()  # SIGKILL after the yes vote
    nd3 = cluster.topology.start(cluster.topology.process("node-bank-2", nd.argv))
    assert node_state(cluster, "node-bank") == ({"a": (100, 40)}, 1)
    async with aio.insecure_channel(nd3.address) as channel:
        stub = pb.ParticipantStub(channel)
        with pytest.raises(aio.AioRpcError) as fenced:
            await stub.Commit(req("debit", 40, shard="s", epoch=2))
        assert fenced.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        for _ in range(2):
            assert (await stub.Commit(req("debit", 40, shard="s", epoch=3))).message == "committed"
    assert node_state(cluster, "node-bank") == ({"a": (60, 0)}, 0)
    assert nd3.stop() == 0  # SIGTERM: a clean stop


async def test_node_stream_answers_each_call_by_id(cluster: Cluster) -> None:
    nd = node_participant(cluster, "node-bank", {"a": 100})

    def req(gid: str, op: str, amount: int) -> pb.BranchRequest:
        payload = json.dumps({"account": "a", "amount": amount}).encode()
        return pb.BranchRequest(gid=gid, branch_id="b1", operation=op, payload=payload)

    calls = [
        pb.BatchedCall(id=1, method=pb.BRANCH_METHOD_PREPARE, request=req("g1", "debit", 30)),
        pb.BatchedCall(id=2, method=pb.BRANCH_METHOD_PREPARE, request=req("g1", "debit", 30)),
        pb.BatchedCall(
            id=3,
            method=99,  # type: ignore[arg-type]
            request=req("g2", "debit", 1),
        ),  # unknown method
        pb.BatchedCall(id=4, method=pb.BRANCH_METHOD_PREPARE, request=req("", "debit", 1)),
        pb.BatchedCall(id=5, method=pb.BRANCH_METHOD_PREPARE, request=req("g3", "debit", 500)),
        pb.BatchedCall(id=6, method=pb.BRANCH_METHOD_COMMIT, request=req("g1", "debit", 30)),
        pb.BatchedCall(id=7, method=pb.BRANCH_METHOD_ABORT, request=req("g4", "debit", 5)),
        pb.BatchedCall(id=8, method=pb.BRANCH_METHOD_PREPARE, request=req("g4", "debit", 5)),
    ]
    async with aio.insecure_channel(nd.address) as channel:
        stream = pb.ParticipantStub(channel).Stream()
        await stream.write(pb.BranchBatch(calls=calls[:4]))
        await stream.write(pb.BranchBatch(calls=calls[4:]))
        await stream.done_writing()
        got = {
            r.id: (r.code, r.response.message or r.message) async for b in stream for r in b.results
        }
    ok, invalid, aborted = (
        grpc.StatusCode.OK.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.ABORTED.value[0],
    )
    assert got[1] == got[2] == (ok, "prepared")  # the duplicate: the recorded answer
    assert got[3][0] == got[4][0] == invalid  # malformed calls, the stream goes on
    assert got[5][0] == aborted and "insufficient funds" in got[5][1]
    assert got[6] == (ok, "committed")
    assert got[7] == (ok, "no-op: aborted before prepare")
    assert got[8][0] == aborted  # the late prepare is refused
    assert node_state(cluster, "node-bank") == ({"a": (70, 0)}, 0)


def test_node_participant_passes_the_conformance_kit(cluster: Cluster) -> None:
    nd = node_participant(cluster, "node-bank", {})
    out = subprocess.run(
        [*accord_argv(["conformance", "--participant", nd.address, "--json"])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    report = json.loads(out.stdout)
    failed = [r["name"] for r in report["rules"] if not r["passed"] and not r["skipped"]]
    assert out.returncode == 0 and report["passed"], f"rules failed: {failed}\n{out.stderr}"
    stream = next(r for r in report["rules"] if r["name"] == "stream")
    assert stream["passed"] and not stream["required"]  # Stream: optional, and passed
    assert report["required"]["passed"] == report["required"]["total"] >= 12
