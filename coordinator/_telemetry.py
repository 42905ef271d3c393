"""The coordinator's spans and metrics, in one place so the engine and the protocol
modules only say *what* happened.

Span tree of a transaction (README, Observability)::

    accord.txn 2pc                      (root; child of the client's span when it sent one)
      accord.prepare                    (phase)
        accord.call Prepare             (CLIENT; its context goes in the call's metadata)
      accord.decision
        accord.wal.sync                 (forced append: waits for the group commit)
      accord.commit | accord.abort
        accord.call Commit ...
    accord.txn saga
      accord.step <name>                (accord.attempt)
        accord.wal.sync, accord.call Execute
      accord.compensate <name>

After a restart the unfinished transactions get an ``accord.recover <protocol>`` root
whose parent is the stored root context (the WAL record that began the transaction holds
its ``traceparent``) and which links to it, so the story stays in one trace.

Retries are events (``retry``, with the status code that caused them) on the phase or
step span. With tracing off (``Telemetry.tracing`` False) no span is created and no
metadata is built; metric instruments are OpenTelemetry's no-ops unless a Prometheus
endpoint is configured. Attribute dicts of the hot path are built once and cached.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import grpc
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

import accord.v1 as pb
from accord.common.telemetry import Telemetry, context_from_traceparent, traceparent_of
from accord.coordinator._calls import CallResult, Verdict
from accord.coordinator._states import TxnState

if TYPE_CHECKING:
    from accord.coordinator._model import StepRt, Txn
    from accord.coordinator._table import TxnTable

_PROTOCOL: dict[int, str] = {pb.PROTOCOL_TWO_PHASE_COMMIT: "2pc", pb.PROTOCOL_SAGA: "saga"}
#: States that end a transaction's story (STUCK until an operator retries).
_OUTCOMES = {
    TxnState.COMMITTED: "committed",
    TxnState.ABORTED: "aborted",
    TxnState.COMPLETED: "completed",
    TxnState.COMPENSATED: "compensated",
    TxnState.STUCK: "stuck",
}
#: 2PC states in which a participant may hold a prepared branch whose outcome it has
#: not heard yet.
_IN_DOUBT = frozenset({TxnState.PREPARING, TxnState.COMMITTING, TxnState.ABORTING})

#: Milliseconds: transaction and phase latency.
_LATENCY_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)
_FSYNC_MS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 500, 1000)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def protocol_name(protocol: int) -> str:
    return _PROTOCOL.get(protocol, str(protocol))


@functools.cache
def _attrs(**kw: str) -> dict[str, str]:
    """One shared attribute dict per label combination (hot path: no dict per call)."""
    return dict(kw)


class CoordinatorTelemetry:
    def __init__(self, telemetry: Telemetry | None = None) -> None:
        t = telemetry or Telemetry.disabled()
        self.tracing = t.tracing
        self._tracer = t.tracer
        self._table: TxnTable | None = None
        #: Records in the most recent fsync'ed group-commit batch (see on_wal_sync).
        self.last_batch = 0
        m = t.meter
        self._started = m.create_counter(
            "accord.transactions.started", description="transactions started, by protocol"
        )
        self._ended = m.create_counter(
            "accord.transactions",
            description="transactions that reached an outcome (committed, aborted, "
            "completed, compensated, stuck), by protocol",
        )
        self._txn_ms = m.create_histogram(
            "accord.transaction.duration",
            unit="ms",
            description="transaction latency, start to outcome",
            explicit_bucket_boundaries_advisory=_LATENCY_MS,
        )
        self._phase_ms = m.create_histogram(
            "accord.phase.duration",
            unit="ms",
            description="latency of a protocol phase (prepare, decision, commit, abort, "
            "step, compensate)",
            explicit_bucket_boundaries_advisory=_LATENCY_MS,
        )
        self._call_ms = m.create_histogram(
            "accord.participant.call.duration",
            unit="ms",
            description="participant call latency by service, method and status code",
            explicit_bucket_boundaries_advisory=_LATENCY_MS,
        )
        self._retries = m.create_counter(
            "accord.participant.call.retries",
            description="participant calls answered 'retry later' (retried), by status",
        )
        self._fallbacks = m.create_counter(
            "accord.participant.stream.fallbacks",
            description="participant addresses found without the Stream RPC, whose calls "
            "went unary (transport auto), by address",
        )
        self._streams = m.create_counter(
            "accord.participant.streams.opened",
            description="participant streams opened (the first call to an address, and "
            "again after a stream broke), by address",
        )
        self._fsync_ms = m.create_histogram(
            "accord.wal.fsync.duration",
            unit="ms",
            description="WAL fdatasync latency",
            explicit_bucket_boundaries_advisory=_FSYNC_MS,
        )
        self._batch = m.create_histogram(
            "accord.wal.batch.size",
            description="records per fsync'ed group-commit batch",
            explicit_bucket_boundaries_advisory=_BATCH,
        )
        self._feed_subs = m.create_up_down_counter(
            "accord.feed.subscribers", description="Subscribe streams connected (event feed)"
        )
        self._feed_events = m.create_counter(
            "accord.feed.events", description="feed events sent, over every subscriber"
        )
        self._feed_catch_ups = m.create_counter(
            "accord.feed.catch_ups",
            description="feed subscribers served from the WAL files on disk, by reason: "
            "start (subscribed behind the live edge), overflow (fell behind its buffer), "
            "snapshot (its records were checkpointed away: served a snapshot)",
        )
        m.create_observable_gauge(
            "accord.transactions.in_flight",
            callbacks=[self._observe_in_flight],
            description="transactions not finished yet, by protocol",
        )
        m.create_observable_gauge(
            "accord.transactions.in_doubt",
            callbacks=[self._observe_in_doubt],
            description="2PC transactions whose participants may hold a prepared branch "
            "without knowing the outcome (PREPARING, COMMITTING, ABORTING)",
        )

    def bind(self, table: TxnTable) -> None:
        """The engine's transaction table, which the gauges read."""
        self._table = table

    # ------------------------------------------------------------------ gauges
    # Called from the metrics endpoint's thread (TxnTable.live is safe there).

    def _live(self) -> list[Txn]:
        return [] if self._table is None else self._table.live()

    def _observe_in_flight(self, _options: CallbackOptions) -> Iterable[Observation]:
        counts = {"2pc": 0, "saga": 0}
        for t in self._live():
            counts[protocol_name(t.protocol)] = counts.get(protocol_name(t.protocol), 0) + 1
        return [Observation(n, _attrs(protocol=p)) for p, n in counts.items()]

    def _observe_in_doubt(self, _options: CallbackOptions) -> Iterable[Observation]:
        n = sum(
            1
            for t in self._live()
            if t.protocol == pb.PROTOCOL_TWO_PHASE_COMMIT
            and t.state in _IN_DOUBT
            and t.rec_prepare is not None
        )
        return [Observation(n)]

    # ------------------------------------------------------------------ transactions

    def started(self, txn: Txn) -> None:
        """A live transaction begins: counted, and its root span opened (a child of the
        caller's context, which the gRPC handler made current)."""
        proto = protocol_name(txn.protocol)
        self._started.add(1, _attrs(protocol=proto))
        txn.started_ns = time.monotonic_ns()
        if not self.tracing:
            return
        span = self._tracer.start_span(
            f"accord.txn {proto}",
            kind=SpanKind.SERVER,
            attributes={"accord.gid": txn.gid, "accord.protocol": proto},
        )
        txn.span = span
        txn.traceparent = traceparent_of(span)

    def recovering(self, txn: Txn, why: str = "recovery") -> None:
        """An unfinished transaction found by recovery (or a STUCK saga retried): a new
        root in the original trace (parent = the stored context), linked to it."""
        txn.started_ns = time.monotonic_ns()
        if not self.tracing:
            return
        proto = protocol_name(txn.protocol)
        parent = context_from_traceparent(txn.traceparent)
        links = []
        if parent is not None:
            links.append(
                Link(trace.get_current_span(parent).get_span_context(), {"accord.link": why})
            )
        span = self._tracer.start_span(
            f"accord.recover {proto}",
            # No stored context (tracing was off before the restart): a new trace.
            context=parent or trace.set_span_in_context(trace.INVALID_SPAN),
            kind=SpanKind.INTERNAL,
            links=links,
            attributes={
                "accord.gid": txn.gid,
                "accord.protocol": proto,
                "accord.recovered": True,
                "accord.reason": why,
                "accord.state": txn.state.name,
            },
        )
        txn.span = span

    def state_changed(self, txn: Txn, new: TxnState) -> None:
        outcome = _OUTCOMES.get(new)
        if outcome is None:
            return
        proto = protocol_name(txn.protocol)
        attrs = _attrs(protocol=proto, outcome=outcome)
        self._ended.add(1, attrs)
        if txn.started_ns:
            self._txn_ms.record((time.monotonic_ns() - txn.started_ns) / 1e6, attrs)
        span = txn.span
        if span is not None:
            txn.span = None
            span.set_attribute("accord.outcome", outcome)
            if txn.protocol == pb.PROTOCOL_SAGA:
                span.set_attribute("accord.steps", len(txn.steps))
            else:
                span.set_attribute("accord.branches", len(txn.branches))
            if txn.reason:
                span.set_attribute("accord.reason", txn.reason)
            if new == TxnState.STUCK:
                span.set_status(Status(StatusCode.ERROR, txn.reason or "stuck"))
            span.end()

    def closing(self, txn: Txn) -> None:
        """The engine closes with ``txn`` unfinished: end its spans (exported as they
        are; recovery continues the story)."""
        for span in (txn.phase_span, txn.span):
            if span is not None and span.is_recording():
                span.set_attribute("accord.interrupted", True)
                span.end()
        txn.phase_span = txn.span = None

    # ------------------------------------------------------------------ phases

    @contextlib.contextmanager
    def phase(self, txn: Txn, name: str) -> Iterator[None]:
        """A 2PC phase (``prepare``, ``decision``, ``commit``, ``abort``): a span under
        the transaction's root, current for the participant calls made inside it."""
        t0 = time.monotonic_ns()
        span = None
        if self.tracing and txn.span is not None and txn.span.is_recording():
            span = self._tracer.start_span(
                f"accord.{name}", context=trace.set_span_in_context(txn.span)
            )
            txn.phase_span = span
        try:
            yield
        finally:
            self._phase_ms.record(
                (time.monotonic_ns() - t0) / 1e6,
                _attrs(protocol=protocol_name(txn.protocol), phase=name),
            )
            if span is not None:
                txn.phase_span = None
                span.end()

    @contextlib.contextmanager
    def step(self, txn: Txn, st: StepRt, compensation: bool) -> Iterator[None]:
        """A saga step's action or compensation (run in parallel: the span lives on the
        step, not on the transaction)."""
        t0 = time.monotonic_ns()
        kind = "compensate" if compensation else "step"
        span = None
        if self.tracing and txn.span is not None and txn.span.is_recording():
            span = self._tracer.start_span(
                f"accord.{kind} {st.spec.name}", context=trace.set_span_in_context(txn.span)
            )
            st.span = span
        try:
            yield
        finally:
            self._phase_ms.record(
                (time.monotonic_ns() - t0) / 1e6, _attrs(protocol="saga", phase=kind)
            )
            if span is not None:
                st.span = None
                span.set_attributes(
                    {
                        "accord.attempt": st.compensation_attempts if compensation else st.attempts,
                        "accord.state": st.state.name,
                    }
                )
                span.end()

    # ------------------------------------------------------------------ calls and WAL

    def call_span(
        self, parent: trace.Span | None, method: str, service: str, branch: str
    ) -> trace.Span | None:
        if not self.tracing or parent is None:
            return None
        if not parent.is_recording():
            # Not sampled: no spans below it; the calls carry its (unsampled) context so
            # the participants do not sample either.
            return parent
        # Few attributes: each one costs microseconds, and there are four calls per
        # two-branch transaction (the span name says the method).
        return self._tracer.start_span(
            f"accord.call {method}",
            context=trace.set_span_in_context(parent),
            kind=SpanKind.CLIENT,
            attributes={"accord.service": service, "accord.branch": branch},
        )

    def call_done(
        self,
        parent: trace.Span | None,
        span: trace.Span | None,
        method: str,
        service: str,
        t0_ns: int,
        result: CallResult,
    ) -> None:
        code = result.code.name
        attrs = _attrs(service=service, method=method, code=code)
        self._call_ms.record((time.monotonic_ns() - t0_ns) / 1e6, attrs)
        retry = result.verdict == Verdict.RETRY
        if retry:
            self._retries.add(1, attrs)
        if span is not None:
            if result.code != grpc.StatusCode.OK:
                span.set_attribute("rpc.grpc.status_code", result.code.value[0])
                if result.code != grpc.StatusCode.ABORTED:  # a "no" vote is not an error
                    span.set_status(Status(StatusCode.ERROR, result.detail))
            span.end()
        if retry and parent is not None and parent.is_recording():
            parent.add_event(
                "retry",
                {"rpc.method": method, "accord.service": service, "rpc.grpc.status": code},
            )

    def on_stream_open(self, address: str) -> None:
        self._streams.add(1, _attrs(address=address))

    def on_stream_fallback(self, address: str) -> None:
        """A participant answered UNIMPLEMENTED to Stream: its calls go unary."""
        self._fallbacks.add(1, _attrs(address=address))

    def on_wal_sync(self, batch: int, seconds: float) -> None:
        """The WAL's ``on_sync`` hook: one fdatasync of a group-commit batch."""
        self.last_batch = batch
        self._fsync_ms.record(seconds * 1000)
        self._batch.record(batch)

    # ------------------------------------------------------------------ event feed

    def feed_subscribed(self, delta: int) -> None:
        self._feed_subs.add(delta)

    def feed_sent(self, events: int) -> None:
        if events:
            self._feed_events.add(events)

    def feed_catch_up(self, why: str) -> None:
        self._feed_catch_ups.add(1, _attrs(reason=why))

    def wal_span(self, parent: trace.Span | None) -> trace.Span | None:
        if not self.tracing or parent is None or not parent.is_recording():
            return None
        return self._tracer.start_span("accord.wal.sync", context=trace.set_span_in_context(parent))

    def wal_done(self, span: trace.Span, lsn: int) -> None:
        span.set_attribute("accord.wal.lsn", lsn)
        span.set_attribute("accord.wal.batch_size", self.last_batch)
        span.end()
