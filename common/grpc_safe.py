"""Requests that do not decode: ``INVALID_ARGUMENT`` and at most one log line.

gRPC decodes a request with the generated ``FromString`` before any handler runs; when
the bytes are not a valid message (corrupt protobuf, invalid UTF-8 in a string field),
grpc.aio answers ``UNKNOWN`` and logs a full traceback for every such request, so any
client could flood the logs. :func:`add_servicer` registers a servicer as its generated
``add_*Servicer_to_server`` function would, with every request deserializer wrapped: a
request that does not decode reaches no handler and is answered ``INVALID_ARGUMENT``
("the request does not decode: ..."), and :class:`UndecodableLog` writes one warning
line per interval at most, with the number of the others since the last line.

A stream of requests (``Participant/Stream``, reflection) ends at the first message that
does not decode: the handler sees the client's stream end there, answers what it has in
flight, and the RPC ends with ``INVALID_ARGUMENT``.

Every server in Accord registers its services (health checking and reflection
included: :func:`add_health`, :func:`add_reflection`) through here."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

__all__ = [
    "UndecodableLog",
    "add_health",
    "add_reflection",
    "add_servicer",
    "refusals_for",
]

#: One log line per this many seconds at most, however many requests do not decode.
LOG_INTERVAL_S = 10.0


class UndecodableLog:
    """Counts requests that did not decode and logs them at most once per
    ``interval_s``: the first one at once, then one line per interval that had any,
    saying how many were not logged since the previous line."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._clock = clock
        self._next_s = float("-inf")
        self._suppressed = 0
        #: Every request refused since start (logged or not).
        self.total = 0

    def note(self, method: str, peer: str, error: str) -> None:
        self.total += 1
        now = self._clock()
        if now < self._next_s:
            self._suppressed += 1
            return
        self._log.warning(
            "event=undecodable_request method=%s peer=%s error=%r suppressed=%d "
            "(one line per %g s at most; answered INVALID_ARGUMENT)",
            method,
            peer,
            error,
            self._suppressed,
            self._interval_s,
        )
        self._suppressed = 0
        self._next_s = now + self._interval_s


class _Undecodable:
    """What a wrapped deserializer returns instead of a request it could not decode."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _safe(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:  # raw bytes: nothing can fail
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # DecodeError, and whatever else a decoder may raise
            return _Undecodable(f"{type(e).__name__}: {e}")

    return decode


def _details(bad: _Undecodable) -> str:
    return f"the request does not decode: {bad.error}"


def _wrap(method: str, h: grpc.RpcMethodHandler, refusals: UndecodableLog) -> Any:
    """``h`` with a deserializer that never raises and a behaviour that answers a
    request it could not decode with INVALID_ARGUMENT."""

    async def refuse(context: Any, bad: _Undecodable) -> None:
        refusals.note(method, context.peer(), bad.error)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _details(bad))

    async def checked(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        # The stream of requests ends at the first one that does not decode.
        async for request in requests:
            if type(request) is _Undecodable:
                refusals.note(method, context.peer(), request.error)
                context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                context.set_details(_details(request))
                return
            yield request

    deserialize = _safe(h.request_deserializer)
    serialize = h.response_serializer
    behaviour = _as_async(
        method,
        h.unary_unary or h.unary_stream or h.stream_unary or h.stream_stream,
        h.response_streaming,
    )
    if not h.request_streaming and not h.response_streaming:

        async def unary_unary(request: Any, context: Any) -> Any:
            if type(request) is _Undecodable:
                await refuse(context, request)
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, serialize)
    if not h.request_streaming:
        if inspect.iscoroutinefunction(behaviour):  # writes with context.write()

            async def unary_write(request: Any, context: Any) -> None:
                if type(request) is _Undecodable:
                    await refuse(context, request)
                await behaviour(request, context)

            return grpc.unary_stream_rpc_method_handler(unary_write, deserialize, serialize)

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if type(request) is _Undecodable:
                await refuse(context, request)
            async for response in behaviour(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, serialize)
    if not h.response_streaming:

        async def stream_unary(requests: AsyncIterator[Any], context: Any) -> Any:
            return await behaviour(checked(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserialize, serialize)
    if inspect.iscoroutinefunction(behaviour):  # writes with context.write()

        async def stream_write(requests: AsyncIterator[Any], context: Any) -> None:
            await behaviour(checked(requests, context), context)

        return grpc.stream_stream_rpc_method_handler(stream_write, deserialize, serialize)

    async def stream_stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for response in behaviour(checked(requests, context), context):
            yield response

    return grpc.stream_stream_rpc_method_handler(stream_stream, deserialize, serialize)


def _as_async(method: str, behaviour: Any, streaming: bool) -> Any:
    """An async handler as it is; a synchronous one as an async handler that calls it on
    the event loop. The synchronous ones on Accord's servers are the generated stubs of
    methods a servicer does not implement (``Health/List``): they raise
    NotImplementedError, answered UNIMPLEMENTED here without gRPC's logged traceback."""
    if inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour):
        return behaviour

    async def unimplemented(context: Any) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")

    if not streaming:

        async def call(request: Any, context: Any) -> Any:
            try:
                return behaviour(request, context)
            except NotImplementedError:
                await unimplemented(context)

        return call

    async def call_stream(request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            responses = behaviour(request, context)
        except NotImplementedError:
            await unimplemented(context)
        for response in responses:
            yield response

    return call_stream


class _Capture:
    """Stands in for the server while a generated ``add_*Servicer_to_server`` runs."""

    def __init__(self) -> None:
        self.services: list[tuple[str, dict[str, grpc.RpcMethodHandler]]] = []

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.services.append((service, handlers))

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        pass  # the same handlers as add_registered_method_handlers gives


#: Where a server keeps its refusal log (shared by every service added to it).
_SERVER_ATTR = "_accord_undecodable_log"


def refusals_for(server: Any, logger: logging.Logger | None = None) -> UndecodableLog:
    """The refusal log of ``server``, made at first use (logging to ``logger``, or
    ``accord.grpc``): every service on one server shares one rate limit."""
    refusals: UndecodableLog | None = getattr(server, _SERVER_ATTR, None)
    if refusals is None:
        refusals = UndecodableLog(logger or logging.getLogger("accord.grpc"))
        setattr(server, _SERVER_ATTR, refusals)
    return refusals


def add_servicer(
    add: Callable[[Any, Any], None],
    servicer: Any,
    server: Any,
    *,
    logger: logging.Logger | None = None,
) -> None:
    """Registers ``servicer`` on ``server`` (a ``grpc.aio.Server``) as
    ``add(servicer, server)`` would, ``add`` being a generated
    ``add_*Servicer_to_server``, with every request that does not decode answered
    INVALID_ARGUMENT and counted in the server's :func:`refusals_for` log (``logger``
    names the log for the first service added to a server)."""
    refusals = refusals_for(server, logger)
    capture = _Capture()
    add(servicer, capture)
    if not capture.services:
        raise TypeError(f"{add!r} registered no method handlers")
    for service, handlers in capture.services:
        wrapped = {name: _wrap(f"/{service}/{name}", h, refusals) for name, h in handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        server.add_registered_method_handlers(service, wrapped)


def add_health(server: Any) -> Any:
    """The standard health service (``grpc.health.v1.Health``) on ``server``, through
    :func:`add_servicer`; returns the servicer (to set the statuses)."""
    from grpc_health.v1 import health, health_pb2_grpc

    servicer = health.aio.HealthServicer()
    add_servicer(health_pb2_grpc.add_HealthServicer_to_server, servicer, server)
    return servicer


def add_reflection(names: Sequence[str], server: Any) -> None:
    """Server reflection for ``names`` on ``server`` (what
    ``reflection.enable_server_reflection`` does for a grpc.aio server), through
    :func:`add_servicer`."""
    from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

    add_servicer(
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
        reflection.aio.ReflectionServicer(names),
        server,
    )
