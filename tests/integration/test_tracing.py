"""One trace per transaction across real processes: an in-test client, a coordinator and
bank participants all export OTLP to a receiver in this process (a real gRPC server on
the opentelemetry-proto messages). A 2PC and a saga each make exactly one trace with the
parent -> child structure client -> transaction -> phase/step -> participant call ->
participant handler; a coordinator killed in the middle and restarted continues the
story in the same trace, linked to the original transaction."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from accord.client import AccordClient, AccordClientError, Branch, SagaStep
from tests.integration._otlp import OtlpReceiver, Span, otlp_receiver
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, balances, open_accounts


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as r:
        yield r


@pytest.fixture
def client_tracing(receiver: OtlpReceiver) -> Iterator[TracerProvider]:
    provider = TracerProvider(resource=Resource.create({"service.name": "accord-client"}))
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True))
    )
    try:
        yield provider
    finally:
        provider.shutdown()


def _by_id(spans: list[Span]) -> dict[str, Span]:
    return {s.span_id: s for s in spans}


def _one(spans: list[Span], name: str, **attrs: object) -> Span:
    found = [
        s
        for s in spans
        if s.name == name and all(s.attributes.get(k) == v for k, v in attrs.items())
    ]
    assert len(found) == 1, f"{name} {attrs}: {len(found)} spans: {found}"
    return found[0]


async def _start(cluster: Cluster, receiver: OtlpReceiver, n: int = 2) -> dict[str, str]:
    names = ["bank-a", "bank-b", "bank-c"][:n]
    procs = {name: cluster.bank(name, env=receiver.env()) for name in names}
    for i, (_name, p) in enumerate(procs.items()):
        await open_accounts(p.address, {f"acct{i}": 100})
    return {name: p.address for name, p in procs.items()}


def transfer(amount: int) -> list[Branch]:
    return [
        Branch(service="bank-a", operation="debit", payload={"account": "acct0", "amount": amount}),
        Branch(
            service="bank-b", operation="credit", payload={"account": "acct1", "amount": amount}
        ),
    ]


@pytest.mark.parametrize("transport", ["stream", "unary"])
async def test_2pc_is_one_trace_across_every_process(
    cluster: Cluster, receiver: OtlpReceiver, client_tracing: TracerProvider, transport: str
) -> None:
    services = await _start(cluster, receiver)
    coord = cluster.coordinator(
        services, env=receiver.env(), extra=["--participant-transport", transport]
    )
    async with AccordClient(coord.address, tracer_provider=client_tracing) as client:
        result = await client.execute(transfer(30))
    assert result.committed
    gid = result.gid

    def complete(spans: list[Span]) -> bool:
        roots = [s for s in spans if s.name == "accord.txn 2pc"]
        handlers = [s for s in spans if s.name.startswith("accord.participant ")]
        return len(roots) == 1 and len(handlers) >= 4

    spans = receiver.wait_for(complete, what="2pc root and 4 participant spans")
    client_span = _one(spans, "accord.client Execute")
    tid = client_span.trace_id
    # Exactly one trace: every span of every process.
    assert {s.trace_id for s in spans} == {tid}
    assert {s.service for s in spans} == {
        "accord-client",
        "accord-coordinator",
        "accord-participant-bank-a",
        "accord-participant-bank-b",
    }
    by_id = _by_id(spans)
    root = _one(spans, "accord.txn 2pc")
    assert root.parent_id == client_span.span_id
    assert root.service == "accord-coordinator"
    assert root.attributes["accord.gid"] == gid
    assert root.attributes["accord.protocol"] == "2pc"
    assert root.attributes["accord.outcome"] == "committed"
    assert root.attributes["accord.branches"] == 2
    assert client_span.attributes["accord.gid"] == gid
    phases = {n: _one(spans, f"accord.{n}") for n in ("prepare", "decision", "commit")}
    for p in phases.values():
        assert p.parent_id == root.span_id
    wal = _one(spans, "accord.wal.sync")
    assert wal.parent_id == phases["decision"].span_id
    assert wal.attributes["accord.wal.batch_size"] >= 1
    for method, phase in (("Prepare", "prepare"), ("Commit", "commit")):
        calls = [s for s in spans if s.name == f"accord.call {method}"]
        assert len(calls) == 2
        assert {c.attributes["accord.service"] for c in calls} == {"bank-a", "bank-b"}
        for call in calls:
            assert call.kind == "CLIENT"
            assert call.parent_id == phases[phase].span_id
        handlers = [s for s in spans if s.name == f"accord.participant {method.lower()}"]
        assert len(handlers) == 2
        for h in handlers:
            assert h.kind == "SERVER"
            # Over the stream the context travels in each call's request, and each
            # handler span is still the child of its own call span.
            assert h.attributes["accord.transport"] == transport
            parent = by_id[h.parent_id]
            assert parent.name == f"accord.call {method}"
            assert h.service == f"accord-participant-{parent.attributes['accord.service']}"
            assert h.attributes["accord.gid"] == gid


async def test_saga_is_one_trace_with_steps_and_compensations(
    cluster: Cluster, receiver: OtlpReceiver, client_tracing: TracerProvider
) -> None:
    services = await _start(cluster, receiver, 3)
    coord = cluster.coordinator(services, env=receiver.env())
    steps = [
        SagaStep(
            name="take",
            service="bank-a",
            action="debit",
            compensation="refund",
            payload={"account": "acct0", "amount": 30},
        ),
        SagaStep(
            name="give",
            service="bank-b",
            action="credit",
            compensation="uncredit",
            payload={"account": "acct1", "amount": 30},
            depends_on=("take",),
        ),
        SagaStep(  # refused: not enough money; take and give are compensated
            name="fail",
            service="bank-c",
            action="debit",
            compensation="refund",
            payload={"account": "acct2", "amount": 1000},
            depends_on=("give",),
        ),
    ]
    async with AccordClient(coord.address, tracer_provider=client_tracing) as client:
        result = await client.start_saga(steps)
    assert result.compensated, result

    processes = {
        "accord-client",
        "accord-coordinator",
        "accord-participant-bank-a",
        "accord-participant-bank-b",
        "accord-participant-bank-c",
    }
    # Each process exports on its own schedule: wait until every one has (bank-c's
    # refused step may arrive after the compensations).
    spans = receiver.wait_for(
        lambda ss: (
            any(s.name == "accord.txn saga" for s in ss)
            and sum(s.name == "accord.participant compensate" for s in ss) >= 2
            and {s.service for s in ss} >= processes
        ),
        what="saga root, its compensations and a span from every process",
    )
    client_span = _one(spans, "accord.client StartSaga")
    assert {s.trace_id for s in spans} == {client_span.trace_id}
    assert {s.service for s in spans} == processes
    by_id = _by_id(spans)
    root = _one(spans, "accord.txn saga")
    assert root.parent_id == client_span.span_id
    assert root.attributes["accord.outcome"] == "compensated"
    assert root.attributes["accord.steps"] == 3
    assert root.attributes["accord.gid"] == result.gid
    for name in ("take", "give", "fail"):
        st = _one(spans, f"accord.step {name}")
        assert st.parent_id == root.span_id
        assert st.attributes["accord.attempt"] == 1
        # Step records ride the group commit: no forced write waits inside a step.
        assert not any(s.name == "accord.wal.sync" and s.parent_id == st.span_id for s in spans)
        call = next(
            s for s in spans if s.name == "accord.call Execute" and s.parent_id == st.span_id
        )
        handler = next(s for s in spans if s.parent_id == call.span_id)
        assert handler.name == "accord.participant execute"
    for name in ("take", "give"):
        comp = _one(spans, f"accord.compensate {name}")
        assert comp.parent_id == root.span_id
        assert comp.attributes["accord.attempt"] == 1
        call = next(
            s for s in spans if s.name == "accord.call Compensate" and s.parent_id == comp.span_id
        )
        handler = next(s for s in spans if s.parent_id == call.span_id)
        assert handler.name == "accord.participant compensate"
        assert by_id[handler.parent_id] == call
    assert not any(s.name == "accord.compensate fail" for s in spans)
    # The saga's forced records (its state changes) are synced in its trace.
    assert any(s.name == "accord.wal.sync" for s in spans)


async def test_recovery_after_a_crash_continues_the_original_trace(
    cluster: Cluster, receiver: OtlpReceiver, client_tracing: TracerProvider
) -> None:
    services = await _start(cluster, receiver)
    env = {**receiver.env(), "ACCORD_FAILPOINTS": "after_decision_fsync=crash"}
    coord = cluster.coordinator(services, env=env)
    port = int(coord.address.rsplit(":", 1)[1])
    tracer = client_tracing.get_tracer("test")
    with tracer.start_as_current_span("order") as order:
        async with AccordClient(coord.address, tracer_provider=client_tracing) as client:
            with pytest.raises(AccordClientError):
                await client.execute(transfer(30), idempotency_key="k1")
        assert coord.wait(15) != 0, "the failpoint should have killed the coordinator"
        coord2 = cluster.coordinator(services, port=port, env=receiver.env())
        async with AccordClient(coord2.address, tracer_provider=client_tracing) as client:
            result = await client.execute(transfer(30), idempotency_key="k1")
            assert result.committed
            await assert_eventually(lambda: client.get(result.gid), lambda t: t.final)
    tid = format(order.get_span_context().trace_id, "032x")
    ba = await assert_eventually(
        lambda: balances(services["bank-a"]), lambda r: r.prepared_branches == 0
    )
    assert ba.total == 70

    spans = receiver.wait_for(
        lambda ss: (
            any(s.name == "accord.recover 2pc" for s in ss)
            and sum(s.name == "accord.participant commit" for s in ss) >= 2
        ),
        what="recovery span and the commits it drove",
    )
    rec = _one(spans, "accord.recover 2pc")
    assert rec.service == "accord-coordinator"
    assert rec.trace_id == tid, "recovery continues the original trace"
    assert rec.attributes["accord.gid"] == result.gid
    assert rec.attributes["accord.recovered"] is True
    assert rec.attributes["accord.outcome"] == "committed"
    # Its parent is the original transaction span (logged in the WAL), and it links to it.
    assert rec.links == [(tid, rec.parent_id, {"accord.link": "recovery"})]
    prepares = [s for s in spans if s.name == "accord.participant prepare"]
    assert len(prepares) == 2 and {s.trace_id for s in prepares} == {tid}
    # The participants' Prepare spans hang under calls of the original transaction.
    commit = next(s for s in spans if s.name == "accord.commit" and s.parent_id == rec.span_id)
    calls = [s for s in spans if s.name == "accord.call Commit" and s.parent_id == commit.span_id]
    assert len(calls) == 2
    handlers = [s for s in spans if s.name == "accord.participant commit"]
    assert {h.parent_id for h in handlers} == {c.span_id for c in calls}
    assert {s.trace_id for s in spans if s.service != "accord-client"} == {tid}
    assert trace.get_current_span() is trace.INVALID_SPAN


async def test_accord_txn_command_starts_the_trace(
    cluster: Cluster, receiver: OtlpReceiver
) -> None:
    services = await _start(cluster, receiver, 1)
    coord = cluster.coordinator(services, env=receiver.env())
    cmd = [
        sys.executable,
        "-m",
        "accord.tools.cli",
        "txn",
        "execute",
        "--json",
        "-c",
        coord.address,
    ]
    cmd.append('bank-a/debit:{"account":"acct0","amount":1}')
    env = {**os.environ, **receiver.env()}
    out = await asyncio.to_thread(
        subprocess.run, cmd, env=env, capture_output=True, text=True, timeout=60, check=True
    )
    gid = json.loads(out.stdout)["gid"]
    spans = receiver.wait_for(
        lambda ss: (
            any(s.name == "accord.txn 2pc" for s in ss)
            and any(s.name == "accord.participant commit" for s in ss)
        ),
        what="a one-phase transaction started by `accord txn execute`",
    )
    client_span = _one(spans, "accord.client Execute")
    assert client_span.service == "accord-client"
    assert client_span.attributes["accord.gid"] == gid
    root = _one(spans, "accord.txn 2pc")
    assert root.parent_id == client_span.span_id and root.attributes["accord.gid"] == gid
    assert {s.trace_id for s in spans} == {client_span.trace_id}
