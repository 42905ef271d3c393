"""Client spans: with a tracer provider that records, each unary call to the coordinator
gets a CLIENT span (``accord.client <Method>``) whose context travels in the call's gRPC
metadata, so the coordinator's transaction is a child of it. The span is made current
for the call, so it is itself a child of whatever span the application has open.

Without a recording provider the plain stub is used: no cost at all."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from accord.common.telemetry import current_metadata

#: Methods that return a single response (``WatchTransaction`` streams: not wrapped).
_UNARY = frozenset(
    {
        "Begin",
        "Enlist",
        "Commit",
        "Abort",
        "Execute",
        "StartSaga",
        "CancelSaga",
        "RetryTransaction",
        "GetTransaction",
        "ListTransactions",
    }
)


def recording(provider: trace.TracerProvider | None) -> bool:
    """Whether ``provider`` (or, when None, the global one) is a real SDK provider."""
    p = provider if provider is not None else trace.get_tracer_provider()
    return not isinstance(p, trace.NoOpTracerProvider | trace.ProxyTracerProvider)


class TracedStub:
    """Wraps a ``CoordinatorStub``: unary methods become traced coroutines."""

    def __init__(self, stub: Any, tracer: trace.Tracer) -> None:
        self._stub = stub
        self._tracer = tracer

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        if name not in _UNARY:
            return method
        # Kept on the instance: later calls find it without __getattr__ (no wrapper made
        # per call).
        traced = self.__dict__[name] = self._traced(name, method)
        return traced

    def _traced(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        tracer = self._tracer

        async def call(request: Any, **kw: Any) -> Any:
            with tracer.start_as_current_span(
                f"accord.client {name}",
                kind=SpanKind.CLIENT,
            ) as span:
                gid = getattr(request, "gid", "")
                if gid:
                    span.set_attribute("accord.gid", gid)
                kw["metadata"] = current_metadata()
                response = await method(request, **kw)
                txn = getattr(response, "transaction", None)
                gid = txn.gid if txn is not None else getattr(response, "gid", "")
                if gid:
                    span.set_attribute("accord.gid", gid)
                    if txn is not None:
                        span.set_attribute("accord.state", txn.state)
                return response

        return call
