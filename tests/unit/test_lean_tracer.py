"""The lean tracer (common/_tracer.py), fast tier: what it writes is a valid OTLP
request with every field the SDK's encoder would give (parsed back with the
opentelemetry-proto messages), it samples as the standard samplers do, its queue is
bounded, and the W3C fast path of the metadata carrier reads and writes exactly what the
propagator's generic path does."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import propagate, trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from accord.common import telemetry as tel
from accord.common._tracer import (
    LeanSpan,
    LeanTracerProvider,
    batch_settings,
    sampler_from,
)
from accord.common.telemetry import incoming_context, outgoing_metadata

_TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Collected:
    """An exporter that keeps the requests it is given, parsed."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.counts: list[int] = []
        self.stopped = False
        self.sent = threading.Event()

    def export_encoded(self, request: bytes, count: int) -> None:
        self.requests.append(ExportTraceServiceRequest.FromString(request))
        self.counts.append(count)
        self.sent.set()

    def shutdown(self) -> None:
        self.stopped = True

    def spans(self) -> list[tuple[str, str, PbSpan]]:
        """(service.name, scope name, span) of every span exported."""
        out = []
        for req in self.requests:
            for rs in req.resource_spans:
                service = next(
                    a.value.string_value for a in rs.resource.attributes if a.key == "service.name"
                )
                for ss in rs.scope_spans:
                    out += [(service, ss.scope.name, s) for s in ss.spans]
        return out


@pytest.fixture
def lean() -> Iterator[tuple[LeanTracerProvider, Collected]]:
    exporter = Collected()
    provider = LeanTracerProvider(
        exporter=exporter,
        resource_attributes={"service.name": "accord-test", "deployment": "unit"},
        schedule_delay_s=60,
    )
    yield provider, exporter
    provider.shutdown()


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    assert kind is not None
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind)


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def test_spans_are_encoded_as_otlp(lean: tuple[LeanTracerProvider, Collected]) -> None:
    provider, exporter = lean
    tracer = provider.get_tracer("accord")
    parent = incoming_context([("traceparent", _TP), ("tracestate", "vendor=x")])
    root = tracer.start_span(
        "accord.txn 2pc",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"accord.gid": "g-1", "accord.protocol": "2pc"},
    )
    assert isinstance(root, LeanSpan) and root.is_recording()
    root.set_attribute("accord.branches", 2)
    root.set_attributes({"accord.ratio": 0.5, "accord.ok": True, "accord.list": ["a", "b"]})
    root.set_attribute("accord.negative", -3)
    root.add_event("retry", {"rpc.grpc.status": "UNAVAILABLE"})
    root.set_status(Status(StatusCode.ERROR, "stuck"))
    child = provider.get_tracer("other").start_span(
        "accord.call Prepare",
        context=trace.set_span_in_context(root),
        kind=SpanKind.CLIENT,
        links=[Link(root.get_span_context(), {"accord.link": "recovery"})],
    )
    child.end()
    root.end()
    root.set_attribute("after", "end")  # ignored: the span has ended
    assert not root.is_recording()
    assert provider.force_flush()

    spans = {s.name: (service, scope, s) for service, scope, s in exporter.spans()}
    assert exporter.counts == [2]
    service, scope, r = spans["accord.txn 2pc"]
    assert (service, scope) == ("accord-test", "accord")
    assert exporter.requests[0].resource_spans[0].resource.attributes[1].key == "deployment"
    ctx = root.get_span_context()
    assert r.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c" == format(ctx.trace_id, "032x")
    assert r.span_id == ctx.span_id.to_bytes(8, "big")
    assert r.parent_span_id.hex() == "b7ad6b7169203331"
    assert r.trace_state == "vendor=x"
    assert r.kind == PbSpan.SPAN_KIND_SERVER
    assert 0 < r.start_time_unix_nano <= r.end_time_unix_nano
    assert r.flags == 0x300  # has-is-remote, is-remote: the parent came over the wire
    assert _attrs(r.attributes) == {
        "accord.gid": "g-1",
        "accord.protocol": "2pc",
        "accord.branches": 2,
        "accord.ratio": 0.5,
        "accord.ok": True,
        "accord.list": ["a", "b"],
        "accord.negative": -3,
    }
    (event,) = r.events
    assert event.name == "retry" and _attrs(event.attributes) == {"rpc.grpc.status": "UNAVAILABLE"}
    assert event.time_unix_nano >= r.start_time_unix_nano
    assert r.status.code == PbStatus.STATUS_CODE_ERROR and r.status.message == "stuck"

    _, scope, c = spans["accord.call Prepare"]
    assert scope == "other"
    assert c.kind == PbSpan.SPAN_KIND_CLIENT and c.parent_span_id == r.span_id
    assert c.trace_id == r.trace_id and c.flags == 0x100  # local parent
    (link,) = c.links
    assert link.span_id == r.span_id and _attrs(link.attributes) == {"accord.link": "recovery"}
    assert link.flags == 0x100
    assert not c.HasField("status")


def test_status_as_the_sdk_sets_it(lean: tuple[LeanTracerProvider, Collected]) -> None:
    provider, exporter = lean
    tracer = provider.get_tracer("accord")
    ok = tracer.start_span("ok")
    ok.set_status(StatusCode.OK)
    ok.set_status(Status(StatusCode.ERROR, "later"))  # OK is final
    ok.end()
    unset = tracer.start_span("unset")
    unset.set_status(StatusCode.UNSET)
    unset.end()
    with pytest.raises(ValueError), tracer.start_as_current_span("raises") as current:
        assert trace.get_current_span() is current
        raise ValueError("boom")
    provider.force_flush()
    spans = {s.name: s for _, _, s in exporter.spans()}
    assert spans["ok"].status.code == PbStatus.STATUS_CODE_OK
    assert not spans["unset"].HasField("status")
    raised = spans["raises"]
    assert raised.status.code == PbStatus.STATUS_CODE_ERROR
    assert [e.name for e in raised.events] == ["exception"]
    assert _attrs(raised.events[0].attributes)["exception.type"] == "ValueError"


def test_sampling_follows_the_parent_and_the_configured_sampler(
    lean: tuple[LeanTracerProvider, Collected],
) -> None:
    provider, exporter = lean
    tracer = provider.get_tracer("accord")
    # parentbased_always_on (inline): a root is sampled ...
    root = tracer.start_span("root")
    assert root.is_recording() and root.get_span_context().trace_flags.sampled
    # ... a child of an unsampled parent is not, and keeps the trace and its flag.
    dropped = incoming_context([("traceparent", _TP[:-2] + "00")])
    child = tracer.start_span("child", context=dropped)
    assert not child.is_recording()
    ctx = child.get_span_context()
    assert ctx.is_valid and not ctx.trace_flags.sampled
    assert format(ctx.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    child.end()
    root.end()
    provider.force_flush()
    assert [s.name for _, _, s in exporter.spans()] == ["root"]

    assert sampler_from({}) is None
    assert sampler_from({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}) is None
    ratio = sampler_from(
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}
    )
    assert isinstance(ratio, ParentBasedTraceIdRatio)
    provider.sampler = ratio
    assert not tracer.start_span("never").is_recording()
    # The parent's decision still wins over the root ratio.
    sampled = incoming_context([("traceparent", _TP)])
    assert tracer.start_span("child", context=sampled).is_recording()
    assert sampler_from({"OTEL_TRACES_SAMPLER": "always_off"}).get_description() == (
        "AlwaysOffSampler"
    )
    assert sampler_from({"OTEL_TRACES_SAMPLER": "nonsense"}) is None


def test_queue_is_bounded_and_a_full_batch_wakes_the_exporter() -> None:
    exporter = Collected()
    provider = LeanTracerProvider(
        exporter=exporter,
        resource_attributes={"service.name": "q"},
        schedule_delay_s=60,
        max_export_batch_size=4,
        max_queue_size=6,
    )
    try:
        tracer = provider.get_tracer("accord")
        # The export thread is woken by a full batch (the 60 s schedule never comes).
        for i in range(4):
            tracer.start_span(f"s{i}").end()
        assert exporter.sent.wait(10)
        # Exports and the queue race; fill past the bound without the thread draining.
        with provider.processor._export_lock:
            for i in range(10):
                tracer.start_span(f"more{i}").end()
        assert provider.processor.dropped == 4
    finally:
        provider.shutdown()
    assert exporter.stopped
    assert sum(exporter.counts) == 10 and max(exporter.counts) <= 4
    assert batch_settings({"OTEL_BSP_SCHEDULE_DELAY": "250", "OTEL_BSP_MAX_QUEUE_SIZE": "x"}) == {
        "schedule_delay_s": 0.25,
        "max_export_batch_size": 512,
        "max_queue_size": 2048,
    }


@pytest.mark.parametrize(
    "headers",
    [
        [("traceparent", _TP)],
        [("traceparent", _TP), ("tracestate", "a=1,b=2")],
        [("traceparent", _TP[:-2] + "00")],
        [("traceparent", "01" + _TP[2:] + "-future")],  # a later version may add fields
        [("traceparent", _TP + "-extra")],  # version 00 may not
        [("traceparent", "ff" + _TP[2:])],
        [("traceparent", "00-" + "0" * 32 + "-b7ad6b7169203331-01")],
        [("traceparent", "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01")],
        [("traceparent", _TP.upper())],
        [("traceparent", "garbage")],
        [("tracestate", "a=1")],
    ],
)
def test_w3c_fast_path_reads_what_the_propagator_reads(headers: list[tuple[str, str]]) -> None:
    assert tel._w3c(propagate.get_global_textmap())
    fast = incoming_context(headers)
    generic = propagate.extract(dict(headers))
    expected = trace.get_current_span(generic).get_span_context()
    if not expected.is_valid:
        assert fast is None
        return
    assert fast is not None
    assert trace.get_current_span(fast).get_span_context() == expected


def test_w3c_fast_path_writes_what_the_propagator_writes() -> None:
    parent = incoming_context([("traceparent", _TP), ("tracestate", "a=1,b=2")])
    unsampled = incoming_context([("traceparent", _TP[:-2] + "00")])
    tracer = TracerProvider().get_tracer("t")
    for context in (parent, unsampled):
        span = tracer.start_span("s", context=context)
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        md = outgoing_metadata(span)
        assert md is not None and dict(md) == carrier


def test_other_propagators_take_the_generic_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    class Custom(TraceContextTextMapPropagator):
        @property
        def fields(self) -> set[str]:
            return {"traceparent", "tracestate", "x-custom"}

    custom = CompositePropagator([Custom()])
    monkeypatch.setattr(propagate, "get_global_textmap", lambda: custom)
    assert not tel._w3c(custom)
    ctx = incoming_context([("traceparent", _TP)])
    assert ctx is not None
    span = trace.get_current_span(ctx)
    assert format(span.get_span_context().span_id, "016x") == "b7ad6b7169203331"
    md = outgoing_metadata(span)
    assert md is not None and dict(md)["traceparent"] == _TP
