"""Telemetry, fast tier: the trace context in gRPC metadata, the log filter and
formatters, the set-up from flags and OTEL_*, and the engine's span tree with a fake WAL
and scripted participants (spans kept in memory)."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

import accord.v1 as pb
from accord.common.logs import JsonFormatter, TextFormatter
from accord.common.telemetry import (
    Telemetry,
    TraceLogFilter,
    bind_gid,
    context_from_traceparent,
    incoming_context,
    outgoing_metadata,
    traceparent_of,
)
from accord.coordinator import CoordinatorConfig, Engine, RetryPolicy, TxnState
from accord.coordinator._calls import CallResult, Verdict
from accord.coordinator._specs import BranchSpec
from accord.coordinator._telemetry import CoordinatorTelemetry
from tests.unit._fakes import FakeCalls, FakeClock, FakeWal

FAST = CoordinatorConfig(retry=RetryPolicy(initial_s=0.001, max_s=0.002), phase_two_wait_s=1.0)


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


# ------------------------------------------------------------------ metadata carrier


def test_metadata_round_trip(spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, _ = spans
    with provider.get_tracer("t").start_as_current_span("call") as span:
        md = outgoing_metadata(span)
        tp = traceparent_of(span)
    assert md is not None
    keys = [k for k, _ in md]
    assert "traceparent" in keys and all(k == k.lower() for k in keys)
    # Extra metadata (as gRPC delivers it) does not confuse the reader.
    ctx = incoming_context([("user-agent", "grpc-python"), *md, ("x-bin", b"\x00")])
    assert ctx is not None
    remote = trace.get_current_span(ctx).get_span_context()
    local = span.get_span_context()
    assert (remote.trace_id, remote.span_id) == (local.trace_id, local.span_id)
    assert remote.is_remote
    assert tp == dict(md)["traceparent"]
    again = context_from_traceparent(tp)
    assert again is not None
    assert trace.get_current_span(again).get_span_context().span_id == local.span_id


def test_nothing_to_carry_without_tracing_and_a_dropped_trace_stays_dropped() -> None:
    assert outgoing_metadata(None) is None
    assert outgoing_metadata(trace.NoOpTracer().start_span("x")) is None
    assert traceparent_of(None) == ""
    # Not sampled: the context still travels, flagged unsampled, so the callee's
    # parent-based sampler drops its spans too (no orphan traces).
    off = TracerProvider(sampler=ALWAYS_OFF)
    md = outgoing_metadata(off.get_tracer("t").start_span("sampled out"))
    assert md is not None
    ctx = incoming_context(md)
    assert ctx is not None
    assert not trace.get_current_span(ctx).get_span_context().trace_flags.sampled
    callee = TracerProvider()  # parentbased_always_on
    assert not callee.get_tracer("t").start_span("handler", context=ctx).is_recording()


def test_garbage_context_is_ignored() -> None:
    assert incoming_context(None) is None
    assert incoming_context([("user-agent", "x")]) is None
    assert incoming_context([("traceparent", "not-a-traceparent")]) is None
    assert context_from_traceparent("") is None
    assert context_from_traceparent("00-" + "0" * 32 + "-" + "0" * 16 + "-01") is None


# ------------------------------------------------------------------ logs


def _record(msg: str = "hello %s", *args: object) -> logging.LogRecord:
    return logging.LogRecord("accord.test", logging.INFO, __file__, 1, msg, args or ("x",), None)


def test_log_lines_carry_gid_and_trace(spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, _ = spans
    f = TraceLogFilter()
    plain = _record()
    assert f.filter(plain) and not hasattr(plain, "trace_id") and not hasattr(plain, "gid")
    with provider.get_tracer("t").start_as_current_span("work") as span:
        token = bind_gid("g-1")
        try:
            rec = _record()
            assert f.filter(rec)
            given = _record()
            given.gid = "explicit"
            f.filter(given)
        finally:
            from accord.common.telemetry import _GID

            _GID.reset(token)
    ctx = span.get_span_context()
    assert rec.gid == "g-1"  # type: ignore[attr-defined]
    assert given.gid == "explicit"  # type: ignore[attr-defined]
    assert rec.trace_id == format(ctx.trace_id, "032x")  # type: ignore[attr-defined]
    assert rec.span_id == format(ctx.span_id, "016x")  # type: ignore[attr-defined]
    line = json.loads(JsonFormatter().format(rec))
    assert (line["msg"], line["gid"], line["trace_id"], line["span_id"]) == (
        "hello x",
        "g-1",
        rec.trace_id,  # type: ignore[attr-defined]
        rec.span_id,  # type: ignore[attr-defined]
    )
    text = TextFormatter().format(rec)
    assert text.endswith(f"hello x gid=g-1 trace_id={rec.trace_id} span_id={rec.span_id}")  # type: ignore[attr-defined]
    # A message that already names its gid does not say it twice.
    own = _record("gid=%s done", "g-1")
    f.filter(own)
    assert TextFormatter().format(own).endswith("gid=g-1 done")


# ------------------------------------------------------------------ set-up


def test_setup_without_configuration_is_disabled() -> None:
    t = Telemetry.setup("accord-test", env={})
    assert not t.tracing and not t.metering and t.tracer_provider() is None
    assert isinstance(t.tracer, trace.NoOpTracer)
    t.shutdown()


def test_setup_serves_metrics_and_names_the_service() -> None:
    t = Telemetry.setup("accord-test", metrics_listen="127.0.0.1:0", env={})
    try:
        assert t.metering and not t.tracing and t.metrics_port > 0
        t.meter.create_counter("accord.test.things").add(2, {"kind": "x"})
        with urllib.request.urlopen(f"http://127.0.0.1:{t.metrics_port}/metrics") as r:
            body = r.read().decode()
        (line,) = [ln for ln in body.splitlines() if ln.startswith("accord_test_things_total{")]
        assert 'kind="x"' in line and line.endswith(" 2.0")
        assert 'service_name="accord-test"' in body
    finally:
        t.shutdown()
        t.shutdown()  # twice is fine
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", "OTEL_SERVICE_NAME": "other"}
    traced = Telemetry.setup("accord-test", env=env)
    try:
        assert traced.tracing and traced.service_name == "other"
    finally:
        traced.shutdown()
    with pytest.raises(ValueError, match="HOST:PORT"):
        Telemetry.setup("accord-test", metrics_listen="nope", env={})


# ------------------------------------------------------------------ engine span tree


@dataclass
class RecordingCalls(FakeCalls):
    metadata: list[tuple[str, tuple[tuple[str, str], ...] | None]] = field(default_factory=list)

    async def call(
        self,
        method: str,
        address: str,
        request: pb.BranchRequest,
        attempt_s: float,
        *,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> CallResult:
        self.metadata.append((method, metadata))
        return await super().call(method, address, request, attempt_s)


def _engine(provider: TracerProvider | None, calls: FakeCalls) -> tuple[Engine, FakeWal]:
    t = Telemetry()
    if provider is not None:
        t = Telemetry(tracer=provider.get_tracer("accord"), tracing=True)
    wal = FakeWal()
    e = Engine(
        wal=wal,
        calls=calls,
        config=FAST,
        clock=FakeClock(),
        telemetry=CoordinatorTelemetry(t),
    )
    return e, wal


def two_branches() -> list[BranchSpec]:
    return [
        BranchSpec(service="bank-a", operation="debit", payload=b"1"),
        BranchSpec(service="bank-b", operation="credit", payload=b"1"),
    ]


def _named(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name]


async def test_engine_span_tree_and_metadata(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    busy = CallResult(Verdict.RETRY, detail="busy", code=grpc.StatusCode.UNAVAILABLE)
    calls = RecordingCalls({("Prepare", "b2"): [busy, CallResult(Verdict.OK)]})
    e, wal = _engine(provider, calls)
    with provider.get_tracer("client").start_as_current_span("client") as client:
        txn = await e.execute(key="", timeout_ms=0, branches=two_branches())
    await txn.finished.wait()
    assert txn.state == TxnState.COMMITTED
    finished = exporter.get_finished_spans()
    (root,) = _named(finished, "accord.txn 2pc")
    assert root.parent is not None and root.parent.span_id == client.get_span_context().span_id
    assert root.attributes is not None
    assert dict(root.attributes) == {
        "accord.gid": txn.gid,
        "accord.protocol": "2pc",
        "accord.outcome": "committed",
        "accord.branches": 2,
    }
    phases = {n: _named(finished, f"accord.{n}")[0] for n in ("prepare", "decision", "commit")}
    assert all(
        p.parent is not None and p.parent.span_id == root.context.span_id for p in phases.values()
    )
    (wal_span,) = _named(finished, "accord.wal.sync")
    assert (
        wal_span.parent is not None
        and wal_span.parent.span_id == phases["decision"].context.span_id
    )
    calls_spans = _named(finished, "accord.call Prepare")
    assert len(calls_spans) == 3  # b2 answered UNAVAILABLE once
    retry = [ev for ev in phases["prepare"].events if ev.name == "retry"]
    assert len(retry) == 1 and retry[0].attributes is not None
    assert retry[0].attributes["rpc.grpc.status"] == "UNAVAILABLE"
    # Each call carried its own span's context; the WAL logged the root's traceparent.
    sent = {dict(md)["traceparent"].split("-")[2] for _, md in calls.metadata if md is not None}
    assert len(calls.metadata) == 5 and len(sent) == 5
    assert {
        format(s.context.span_id, "016x") for s in finished if s.name.startswith("accord.call")
    } == sent
    prepare_rec = pb.WalPrepare.FromString(wal.records[0][2])
    assert prepare_rec.traceparent.split("-")[2] == format(root.context.span_id, "016x")


async def test_engine_without_tracing_sends_no_metadata() -> None:
    calls = RecordingCalls()
    e, wal = _engine(None, calls)
    txn = await e.execute(key="", timeout_ms=0, branches=two_branches())
    await txn.finished.wait()
    assert txn.span is None and txn.traceparent == ""
    assert [md for _, md in calls.metadata] == [None] * 4
    assert pb.WalPrepare.FromString(wal.records[0][2]).traceparent == ""


async def test_recovery_span_continues_the_logged_trace(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    e, _ = _engine(provider, RecordingCalls())
    # The coordinator had logged the branch list and the COMMIT decision, then died.
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    branches = [
        pb.Branch(
            service=b.service, operation=b.operation, payload=b.payload, branch_id=f"b{i + 1}"
        )
        for i, b in enumerate(two_branches())
    ]
    prepare = pb.WalPrepare(gid="g1", branches=branches, traceparent=tp)
    commit = pb.WalCommit(gid="g1", branch_ids=["b1", "b2"])
    from accord.coordinator._records import RT_COMMIT, RT_PREPARE

    e.replay(
        None,
        [
            (1, int(RT_PREPARE), prepare.SerializeToString()),
            (2, int(RT_COMMIT), commit.SerializeToString()),
        ],
    )
    assert await e.resume() == 1
    txn = e.get("g1")
    await txn.finished.wait()
    (rec,) = _named(exporter.get_finished_spans(), "accord.recover 2pc")
    assert format(rec.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert rec.parent is not None and format(rec.parent.span_id, "016x") == "b7ad6b7169203331"
    assert [format(ln.context.span_id, "016x") for ln in rec.links] == ["b7ad6b7169203331"]
    assert rec.attributes is not None and rec.attributes["accord.outcome"] == "committed"
    commits = _named(exporter.get_finished_spans(), "accord.call Commit")
    assert len(commits) == 2
    assert {format(c.context.trace_id, "032x") for c in commits} == {
        "0af7651916cd43dd8448eb211c80319c"
    }


async def test_unsampled_transaction_makes_no_spans_but_carries_its_context() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # parentbased_always_on: follows the client
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    client = TracerProvider(sampler=ALWAYS_OFF)
    calls = RecordingCalls()
    e, _ = _engine(provider, calls)
    with client.get_tracer("client").start_as_current_span("dropped"):
        txn = await e.execute(key="", timeout_ms=0, branches=two_branches())
    await txn.finished.wait()
    assert exporter.get_finished_spans() == ()
    flags = {dict(md)["traceparent"].rsplit("-", 1)[1] for _, md in calls.metadata if md}
    assert len(calls.metadata) == 4 and flags and all(int(f, 16) & 1 == 0 for f in flags)
