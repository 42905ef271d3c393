"""The stream transport (``--participant-transport stream|auto``) with real processes:
2PC commit and no-vote abort, a saga that compensates, money conserved under a
concurrent workload and across a participant SIGKILLed mid-workload; unary fallback for
a participant without ``Stream`` (the bench's bare participant); and, on a raw stream to
a real bank, fencing and malformed calls answered per call while the stream goes on."""

from __future__ import annotations

import asyncio
import random
import re
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest

import accord.v1 as pb
from accord.client import AccordClient, Branch, SagaStep
from accord.common.transport import TransportSettings, make_channel
from accord.coordinator._calls import ParticipantCalls, Transport, Verdict
from accord.coordinator._methods import Method
from accord.registry import StaticRegistry
from tests.integration._bank_helpers import branch
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, balances, free_port, open_accounts

pytestmark = pytest.mark.integration

OK = grpc.StatusCode.OK.value[0]
REPO_ROOT = str(Path(__file__).resolve().parents[2])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text: str = resp.read().decode()
        return text


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m is None:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


OPENED = "accord_participant_streams_opened_total"
FALLBACKS = "accord_participant_stream_fallbacks_total"


def transfer(src: str, dst: str, a: str, b: str, amount: int) -> list[Branch]:
    return [
        Branch(service=src, operation="debit", payload={"account": a, "amount": amount}),
        Branch(service=dst, operation="credit", payload={"account": b, "amount": amount}),
    ]


async def workload(
    client: AccordClient, n: int, concurrency: int, seed: int, done: list[str] | None = None
) -> list[str]:
    """``n`` random transfers between bank-a and bank-b (some refused for want of funds),
    ``concurrency`` at a time; returns each one's gid (and appends it to ``done`` as
    soon as it returns)."""
    rng = random.Random(seed)
    plans = []
    for _ in range(n):
        if rng.random() < 0.5:
            plans.append(transfer("bank-a", "bank-b", "a", "b", rng.randint(1, 40)))
        else:
            plans.append(transfer("bank-b", "bank-a", "b", "a", rng.randint(1, 40)))
    sem = asyncio.Semaphore(concurrency)

    async def one(branches: list[Branch]) -> str:
        async with sem:
            gid = (await client.execute(branches)).gid
        if done is not None:
            done.append(gid)
        return gid

    return await asyncio.gather(*(one(p) for p in plans))


async def settled_total(*addresses: str) -> int:
    total = 0
    for address in addresses:
        r = await assert_eventually(
            lambda a=address: balances(a),  # type: ignore[misc]
            lambda r: r.prepared_branches == 0,
            what=f"{address} settled",
        )
        total += r.total
    return total


async def test_2pc_saga_and_workload_over_the_stream(cluster: Cluster) -> None:
    a, b, c = (cluster.bank(n) for n in ("bank-a", "bank-b", "bank-c"))
    await open_accounts(a.address, {"a": 500})
    await open_accounts(b.address, {"b": 500})
    await open_accounts(c.address, {"c": 10})
    mport = free_port()
    coord = cluster.coordinator(
        {"bank-a": a.address, "bank-b": b.address, "bank-c": c.address},
        extra=["--participant-transport", "stream", "--metrics-listen", f"127.0.0.1:{mport}"],
    )
    async with AccordClient(coord.address, timeout_s=30) as client:
        ok = await client.execute(transfer("bank-a", "bank-b", "a", "b", 100))
        assert ok.committed and ok.state == "COMMITTED"
        no = await client.execute(transfer("bank-a", "bank-b", "a", "b", 10_000))
        assert no.state == "ABORTED" and "insufficient" in no.reason.lower(), no
        assert ((await balances(a.address)).total, (await balances(b.address)).total) == (
            400,
            600,
        )
        saga = await client.start_saga(
            [
                SagaStep(
                    name="take",
                    service="bank-a",
                    action="debit",
                    compensation="refund",
                    payload={"account": "a", "amount": 30},
                ),
                SagaStep(
                    name="give",
                    service="bank-b",
                    action="credit",
                    compensation="uncredit",
                    payload={"account": "b", "amount": 30},
                    depends_on=("take",),
                ),
                SagaStep(  # refused (bank-c holds 10): take and give are compensated
                    name="fail",
                    service="bank-c",
                    action="debit",
                    compensation="refund",
                    payload={"account": "c", "amount": 1000},
                    depends_on=("give",),
                ),
            ]
        )
        assert saga.compensated, saga
        assert {s.name: s.state for s in saga.steps}["take"] == "COMPENSATED"
        gids = await workload(client, 120, 24, seed=7)
        states = [(await client.get(g)).state for g in gids]
        assert set(states) <= {"COMMITTED", "ABORTED"} and "COMMITTED" in states
    assert await settled_total(a.address, b.address) == 1000
    assert (await balances(c.address)).total == 10
    metrics = scrape(mport)
    for bank in (a, b, c):
        # One stream per participant, never broken, never unary.
        assert metric(metrics, OPENED, address=bank.address) == 1, metrics
    assert metric(metrics, FALLBACKS) == 0


async def test_participant_sigkilled_mid_workload(cluster: Cluster) -> None:
    port_b = free_port()
    a = cluster.bank("bank-a")
    b = cluster.bank("bank-b", port=port_b)
    await open_accounts(a.address, {"a": 2000})
    await open_accounts(b.address, {"b": 2000})
    mport = free_port()
    coord = cluster.coordinator(
        {"bank-a": a.address, "bank-b": b.address},
        extra=["--participant-transport", "stream", "--metrics-listen", f"127.0.0.1:{mport}"],
    )
    async with AccordClient(coord.address, timeout_s=60) as client:
        done: list[str] = []
        running = asyncio.ensure_future(workload(client, 600, 16, seed=11, done=done))
        await assert_eventually(
            lambda: asyncio.sleep(0, len(done)), lambda n: n >= 150, what="150 transfers done"
        )
        assert not running.done(), "the workload ended before the kill: make it longer"
        b.kill()  # SIGKILL with stream calls in flight
        await asyncio.sleep(0.5)
        b = cluster.bank("bank-b", port=port_b)  # same address and database
        gids = await running
        finals = []
        for gid in gids:
            txn = await assert_eventually(
                lambda g=gid: client.get(g),  # type: ignore[misc]
                lambda t: t.final,
                what=f"{gid} decided",
            )
            finals.append(txn.state)
    assert set(finals) <= {"COMMITTED", "ABORTED"} and "COMMITTED" in finals
    assert await settled_total(a.address, b.address) == 4000
    # The stream to bank-b broke and was opened again on the restarted process.
    assert metric(scrape(mport), OPENED, address=b.address) >= 2


async def test_unary_fallback_for_a_participant_without_stream(cluster: Cluster) -> None:
    a = cluster.bank("bank-a")
    await open_accounts(a.address, {"a": 100})
    bare = cluster.topology.process(
        "bare",
        [sys.executable, "-m", "bench.baseline", "participant", "--listen", "127.0.0.1:0"],
        env={"PYTHONPATH": REPO_ROOT},
    )
    cluster.topology.start(bare)
    mport = free_port()
    coord = cluster.coordinator(
        {"bank-a": a.address, "bare": bare.address},
        extra=["--metrics-listen", f"127.0.0.1:{mport}"],  # transport: auto (the default)
    )
    async with AccordClient(coord.address, timeout_s=30) as client:
        for i in range(3):
            result = await client.execute(
                [
                    Branch(
                        service="bank-a", operation="debit", payload={"account": "a", "amount": 1}
                    ),
                    Branch(service="bare", operation="anything", payload={"n": i}),
                ]
            )
            assert result.committed, result
    assert (await balances(a.address)).total == 97
    metrics = scrape(mport)
    assert metric(metrics, FALLBACKS, address=bare.address) == 1, metrics
    assert metric(metrics, FALLBACKS, address=a.address) == 0
    assert metric(metrics, OPENED, address=a.address) == 1


class RawStream:
    def __init__(self, address: str) -> None:
        self.channel = make_channel(address)
        self.call = pb.ParticipantStub(self.channel).Stream()

    async def ask(self, *calls: tuple[int, int, pb.BranchRequest]) -> dict[int, pb.BatchedResult]:
        batch = pb.BranchBatch()
        for call_id, method, request in calls:
            batch.calls.add(id=call_id, method=method, request=request)
        await self.call.write(batch)
        got: dict[int, pb.BatchedResult] = {}
        async with asyncio.timeout(10):
            while len(got) < len(calls):
                msg = await self.call.read()
                assert msg is not grpc.aio.EOF
                got.update({r.id: r for r in msg.results})
        return got

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


async def test_fencing_and_malformed_calls_on_a_real_bank_stream(cluster: Cluster) -> None:
    bank = cluster.bank("bank")
    await open_accounts(bank.address, {"x": 100})
    s = RawStream(bank.address)
    try:
        new = branch("g1", "b1", "balance", "x", shard="s1", epoch=5)
        r = await s.ask((1, pb.BRANCH_METHOD_PREPARE, new))
        assert r[1].code == OK and r[1].response.read_only
        stale = branch("g2", "b1", "debit", "x", 10, shard="s1", epoch=4)
        r = await s.ask((2, pb.BRANCH_METHOD_PREPARE, stale))
        assert r[2].code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert r[2].message.startswith("fenced:"), r[2]
        r = await s.ask(
            (3, 42, branch("g3", "b1", "debit", "x", 10)),
            (4, pb.BRANCH_METHOD_PREPARE, branch("", "b1", "debit", "x", 10)),
            (
                5,
                pb.BRANCH_METHOD_PREPARE,
                branch("g5", "b1", "debit", "x", 10, shard="s1", epoch=5),
            ),
        )
        invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert (r[3].code, r[4].code) == (invalid, invalid), r
        assert r[5].code == OK  # the same stream still works
        assert (await balances(bank.address)).total_held == 10
    finally:
        await s.close()

    # The coordinator's side: a fenced answer over the stream reaches on_fenced.
    fenced: list[str] = []
    calls = ParticipantCalls(
        registry=StaticRegistry(),
        transport=TransportSettings(),
        mode=Transport.STREAM,
        on_fenced=fenced.append,
    )
    try:
        result = await calls.call(
            Method.PREPARE,
            bank.address,
            branch("g6", "b1", "debit", "x", 1, shard="s1", epoch=3),
            5,
        )
        assert (
            result.verdict is Verdict.RETRY and result.code == grpc.StatusCode.FAILED_PRECONDITION
        )
        assert len(fenced) == 1 and "fenced: epoch 3 < 5" in fenced[0], fenced
        assert calls.streams_opened == 1
    finally:
        await calls.close()
