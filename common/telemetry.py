"""Telemetry for every Accord process: OpenTelemetry traces, metrics on a Prometheus
endpoint, and the trace context carried in gRPC metadata.

Set-up (:meth:`Telemetry.setup`) follows the standard ``OTEL_*`` configuration:

* traces go to OTLP over gRPC when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, to the console with ``--trace-console``,
  nowhere otherwise; spans are batched (``OTEL_BSP_*``), sampled as
  ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` say; to OTLP alone they go through
  Accord's lean tracer (:mod:`accord.common._tracer`: the OpenTelemetry API and OTLP
  output, a fifth of the SDK's CPU per span), with the console through the SDK;
  ``OTEL_SERVICE_NAME`` and
  ``OTEL_RESOURCE_ATTRIBUTES`` name the process (default: the name the caller gives);
* metrics are served in Prometheus text format over HTTP on ``--metrics-listen
  HOST:PORT`` (no endpoint, no-op instruments otherwise).

With neither, the tracer and meter are OpenTelemetry's no-op ones and ``tracing`` is
False: callers skip span work entirely, so a process without telemetry pays nothing.

The trace context travels in gRPC metadata (W3C ``traceparent``/``tracestate`` through
the configured propagator), put there by :func:`outgoing_metadata` and read by
:func:`incoming_context`. This is deliberately not a gRPC interceptor: the
opentelemetry-instrumentation-grpc aio interceptors cost about 0.24 ms of CPU per RPC
(DESIGN, Observability); a carrier over the metadata tuples costs a few microseconds and
only runs when a span is recording.

Shutting down flushes pending spans for at most :data:`SHUTDOWN_S` seconds (the SDK's
own bound is 30 s per processor, more with the exporter's retries): with the trace
backend gone, a process still exits promptly, and the spans not sent are dropped.

Logs: :class:`TraceLogFilter` adds ``gid``, ``trace_id`` and ``span_id`` to every log
record from the current context (:func:`bind_gid` sets the gid for a task).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter, TextMapPropagator
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

log = logging.getLogger("accord.telemetry")

Metadata = tuple[tuple[str, str], ...]

#: The longest :meth:`Telemetry.shutdown` waits for pending spans to be exported.
SHUTDOWN_S = 3.0


# ------------------------------------------------------------------ metadata carrier


class _MetadataGetter(Getter[Sequence[tuple[str, Any]]]):
    """Reads a propagation header from gRPC metadata tuples (keys are lower case)."""

    def get(self, carrier: Sequence[tuple[str, Any]], key: str) -> list[str] | None:
        key = key.lower()
        values = [v for k, v in carrier if k == key and isinstance(v, str)]
        return values or None

    def keys(self, carrier: Sequence[tuple[str, Any]]) -> list[str]:
        return [k for k, _ in carrier]


class _ListSetter(Setter[list[tuple[str, str]]]):
    def set(self, carrier: list[tuple[str, str]], key: str, value: str) -> None:
        carrier.append((key.lower(), value))


_GETTER = _MetadataGetter()
_SETTER = _ListSetter()

#: The headers the default propagator (``OTEL_PROPAGATORS=tracecontext,baggage``) uses.
_W3C_FIELDS = frozenset({"traceparent", "tracestate", "baggage"})
_TRACEPARENT = re.compile(
    r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?[ \t]*$"
)


@functools.lru_cache(maxsize=8)
def _w3c(textmap: TextMapPropagator) -> bool:
    """Whether the global propagator writes only the W3C headers: then they are written
    and read here directly (a format string and a regex, about 2 µs) instead of
    through the propagator's generic path (about 15 µs a call). Baggage is never
    carried: Accord propagates a span's context alone, never a caller's baggage."""
    fields = textmap.fields
    return "traceparent" in fields and fields <= _W3C_FIELDS


def outgoing_metadata(span: trace.Span | None) -> Metadata | None:
    """gRPC metadata carrying ``span``'s context, or None when there is nothing to carry
    (no span, or tracing off). A span that was not sampled is carried too (its flags say
    so), so the callee does not sample what the caller dropped."""
    if span is None:
        return None
    sc = span.get_span_context()
    if not sc.is_valid:
        return None
    if _w3c(propagate.get_global_textmap()):
        tp = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"
        if sc.trace_state:
            return (("traceparent", tp), ("tracestate", sc.trace_state.to_header()))
        return (("traceparent", tp),)
    carrier: list[tuple[str, str]] = []
    propagate.inject(carrier, context=trace.set_span_in_context(span), setter=_SETTER)
    return tuple(carrier) if carrier else None


def current_metadata() -> Metadata | None:
    """gRPC metadata carrying the current span's context (see :func:`outgoing_metadata`)."""
    return outgoing_metadata(trace.get_current_span())


def incoming_context(metadata: Iterable[tuple[str, Any]] | None) -> Context | None:
    """The remote parent context found in incoming gRPC metadata, or None."""
    if not metadata:
        return None
    items = [(k, v) for k, v in metadata if k in ("traceparent", "tracestate")]
    if not items:
        return None
    if _w3c(propagate.get_global_textmap()):
        return _w3c_context(items)
    ctx = propagate.extract(items, getter=_GETTER)
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


def _w3c_context(items: list[tuple[str, Any]]) -> Context | None:
    """``traceparent``/``tracestate`` read as the W3C propagator reads them."""
    parents = [v for k, v in items if k == "traceparent" and isinstance(v, str)]
    if not parents or len(parents[0]) > 512:
        return None
    m = _TRACEPARENT.match(parents[0])
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or int(trace_id, 16) == 0:
        return None
    if int(span_id, 16) == 0:
        return None
    states = [v for k, v in items if k == "tracestate" and isinstance(v, str)]
    state = TraceState.from_header(states) if states else None
    sc = SpanContext(
        int(trace_id, 16),
        int(span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(flags, 16)),
        trace_state=state,
    )
    return trace.set_span_in_context(NonRecordingSpan(sc))


def context_from_traceparent(traceparent: str, tracestate: str = "") -> Context | None:
    """The context a stored ``traceparent`` (e.g. from the WAL) names, or None."""
    if not traceparent:
        return None
    items = [("traceparent", traceparent)]
    if tracestate:
        items.append(("tracestate", tracestate))
    return incoming_context(items)


def traceparent_of(span: trace.Span | None) -> str:
    """The W3C ``traceparent`` of ``span`` ("" when there is none)."""
    md = outgoing_metadata(span)
    if not md:
        return ""
    for k, v in md:
        if k == "traceparent":
            return v
    return ""


# ------------------------------------------------------------------ logs

_GID: contextvars.ContextVar[str] = contextvars.ContextVar("accord_gid", default="")


def bind_gid(gid: str) -> contextvars.Token[str]:
    """Log lines of the current task (and tasks it starts) carry ``gid``."""
    return _GID.set(gid)


def attach_span(span: trace.Span) -> object:
    """Makes ``span`` current in this task (log lines then carry its ids)."""
    return otel_context.attach(trace.set_span_in_context(span))


class TraceLogFilter(logging.Filter):
    """Adds ``gid``, ``trace_id`` and ``span_id`` to a log record when there is one (a
    ``gid`` given in ``extra`` wins). Install on handlers: it never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "gid"):
            gid = _GID.get()
            if gid:
                record.gid = gid
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        return True


# ------------------------------------------------------------------ set-up


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--metrics-listen: expected HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


@dataclass(kw_only=True)
class Telemetry:
    """A process's tracer and meter, and what must be flushed and stopped at exit.

    ``tracing`` is True when spans are exported somewhere; code on the hot path checks
    it before doing any span work."""

    tracer: trace.Tracer = field(default_factory=trace.NoOpTracer)
    meter: metrics.Meter = field(default_factory=lambda: metrics.NoOpMeter("accord"))
    tracing: bool = False
    metering: bool = False
    #: The Prometheus endpoint's port (0 when there is none).
    metrics_port: int = 0
    service_name: str = ""
    _tracer_provider: Any = None
    #: The span exporters, shut down directly when a flush outlasts :data:`SHUTDOWN_S`.
    _exporters: list[Any] = field(default_factory=list)
    _meter_provider: Any = None
    _http: Any = None
    _closed: bool = False

    @classmethod
    def disabled(cls) -> Telemetry:
        return cls()

    @classmethod
    def setup(
        cls,
        service_name: str,
        *,
        trace_console: bool = False,
        metrics_listen: str = "",
        env: dict[str, str] | None = None,
    ) -> Telemetry:
        """Tracing and metrics for this process, from the flags and ``OTEL_*``."""
        environ = os.environ if env is None else env
        otlp = bool(
            environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        )
        if not (otlp or trace_console or metrics_listen):
            return cls.disabled()

        from opentelemetry.sdk.resources import SERVICE_NAME, Resource

        name = environ.get("OTEL_SERVICE_NAME") or service_name
        resource = Resource.create({SERVICE_NAME: name})
        out = cls(service_name=name)
        if otlp and not trace_console:
            from accord.common._tracer import (
                LeanTracerProvider,
                batch_settings,
                otlp_exporter,
                sampler_from,
            )

            # The lean tracer (common/_tracer.py: the same API and OTLP output, about a
            # fifth of the SDK's CPU per span).
            # With ``env`` given, its endpoint (the exporter reads the process's own).
            endpoint = None
            if env is not None:
                endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
                    "OTEL_EXPORTER_OTLP_ENDPOINT"
                )
            exporter = otlp_exporter(endpoint)
            out._exporters.append(exporter)
            lean = LeanTracerProvider(
                exporter=exporter,
                resource_attributes=dict(resource.attributes),
                sampler=sampler_from(environ),
                **batch_settings(environ),
            )
            out._tracer_provider = lean
            out.tracer = lean.get_tracer("accord")
            out.tracing = True
        elif trace_console:
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

            # No sampler given: the SDK reads OTEL_TRACES_SAMPLER(_ARG).
            provider = TracerProvider(resource=resource)
            if otlp:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter,
                )

                sdk_otlp = OTLPSpanExporter()
                out._exporters.append(sdk_otlp)
                provider.add_span_processor(BatchSpanProcessor(sdk_otlp))
            if trace_console:
                console = ConsoleSpanExporter()
                out._exporters.append(console)
                provider.add_span_processor(BatchSpanProcessor(console))
            out._tracer_provider = provider
            out.tracer = provider.get_tracer("accord")
            out.tracing = True
        if metrics_listen:
            out._start_metrics(metrics_listen, resource)
        return out

    def _start_metrics(self, listen: str, resource: Any) -> None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from prometheus_client import CollectorRegistry, start_http_server

        host, port = parse_listen(listen)
        registry = CollectorRegistry(auto_describe=True)
        reader = PrometheusMetricReader(registry=registry, disable_target_info=False)
        provider = MeterProvider(metric_readers=[reader], resource=resource)
        server, _thread = start_http_server(port, addr=host, registry=registry)
        self._http = server
        self._meter_provider = provider
        self.meter = provider.get_meter("accord")
        self.metering = True
        self.metrics_port = int(server.server_port)
        log.info("event=metrics_serving url=http://%s:%d/metrics", host, self.metrics_port)

    def shutdown(self, timeout_s: float = SHUTDOWN_S) -> None:
        """Flushes pending spans (for at most ``timeout_s`` seconds) and stops the
        exporters and the metrics endpoint; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._tracer_provider is not None:
            self._shutdown_traces(timeout_s)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._meter_provider is not None:
            try:
                self._meter_provider.shutdown()
            except Exception:
                log.exception("event=telemetry_metrics_stop_failed")

    def _shutdown_traces(self, timeout_s: float) -> None:
        """The SDK's shutdown flushes in a thread of its own (a batch processor waits up
        to 30 s, and an OTLP export retries with backoff meanwhile); past ``timeout_s``
        the exporters are shut down directly, which ends their retries and closes their
        channels, so the flush returns and the spans left are dropped."""
        provider = self._tracer_provider

        def flush() -> None:
            try:
                provider.shutdown()
            except Exception:
                log.exception("event=telemetry_flush_failed")

        t0 = time.monotonic()
        flusher = threading.Thread(target=flush, name="telemetry-shutdown", daemon=True)
        flusher.start()
        flusher.join(timeout_s)
        if not flusher.is_alive():
            return
        log.warning(
            "event=telemetry_flush_abandoned after_s=%.1f (the trace backend does not "
            "answer; spans not yet exported are dropped)",
            time.monotonic() - t0,
        )
        for exporter in self._exporters:
            try:
                exporter.shutdown()
            except Exception:
                log.exception("event=telemetry_exporter_stop_failed")
        flusher.join(1.0)

    def tracer_provider(self) -> Any:
        """The SDK tracer provider (None when tracing is off)."""
        return self._tracer_provider
