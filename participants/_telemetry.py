"""A participant's spans and metrics: one SERVER span per handled call, a child of the
coordinator's call span (its context comes in the call's metadata or the request's
``trace_context``); handler latency; barrier hits (duplicates answered from the
barrier); prepared branches held.

With tracing off no span is made; without a metrics endpoint the instruments are
no-ops. The prepared-branch gauge is read when scraped, through the backend's
:meth:`~accord.participants._backend.Backend.prepared_gauge` (on SQLite its own read-only
connection: the store's writer thread is never asked)."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode

from accord.common.telemetry import Telemetry, incoming_context
from accord.participants._types import BranchCall, Op, Result
from accord.participants._types import Status as CallStatus

_LATENCY_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


@functools.cache
def _attrs(**kw: str) -> dict[str, str]:
    return dict(kw)


class ParticipantTelemetry:
    def __init__(
        self,
        telemetry: Telemetry | None,
        *,
        service: str,
        prepared: Callable[[], int | None] | None = None,
    ) -> None:
        t = telemetry or Telemetry.disabled()
        self.tracing = t.tracing
        self.metering = t.metering
        self._tracer = t.tracer
        self._service = service
        self._prepared = prepared
        self._lock = threading.Lock()
        m = t.meter
        self._handled_ms = m.create_histogram(
            "accord.participant.handler.duration",
            unit="ms",
            description="participant call handling latency (barrier, handler, durable "
            "commit), by op and status",
            explicit_bucket_boundaries_advisory=_LATENCY_MS,
        )
        self._hits = m.create_counter(
            "accord.participant.barrier.hits",
            description="duplicate calls answered from the barrier without running the "
            "handler, by op",
        )
        if t.metering and prepared is not None:
            m.create_observable_gauge(
                "accord.participant.branches.prepared",
                callbacks=[self._observe_prepared],
                description="branches held PREPARED (yes vote given, outcome not applied)",
            )

    def start(self, op: Op, call: BranchCall, transport: str = "unary") -> trace.Span | None:
        """``transport``: ``unary`` (one RPC per call) or ``stream`` (a call of a
        ``Stream`` batch)."""
        if not self.tracing:
            return None
        parent = incoming_context(call.trace_context.items()) if call.trace_context else None
        return self._tracer.start_span(
            f"accord.participant {op.value}",
            context=parent,
            kind=SpanKind.SERVER,
            # Few attributes (each costs microseconds): the span name says the op, the
            # resource says the service.
            attributes={
                "accord.gid": call.gid,
                "accord.branch": call.branch_id,
                "accord.transport": transport,
            },
        )

    def done(self, span: trace.Span | None, op: Op, result: Result | None, t0_ns: int) -> None:
        if span is None and not self.metering:
            return  # nothing to record: the no-op instruments would still cost a microsecond or two
        status = result.status.value if result is not None else "INTERNAL"
        self._handled_ms.record(
            (time.monotonic_ns() - t0_ns) / 1e6, _attrs(op=op.value, status=status)
        )
        duplicate = result is not None and result.duplicate
        if duplicate:
            self._hits.add(1, _attrs(op=op.value))
        if span is not None:
            if duplicate:
                span.set_attribute("accord.barrier_hit", True)
            if result is None or result.status is not CallStatus.OK:
                span.set_attribute("accord.status", status)
                if result is None or result.status is not CallStatus.REFUSED:
                    span.set_status(Status(StatusCode.ERROR, result.message if result else status))
            span.end()

    def _observe_prepared(self, _options: CallbackOptions) -> Iterable[Observation]:
        assert self._prepared is not None
        with self._lock:
            count = self._prepared()
        if count is None:
            return []
        return [Observation(count, _attrs(service=self._service))]

    def close(self) -> None:
        """Nothing to release: the backend owns the gauge's connection."""
