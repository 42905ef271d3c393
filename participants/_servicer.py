"""The accord.v1.Participant gRPC servicer: a thin translation between protobuf and the
transport-neutral :class:`~participants._service.ParticipantService`. The one table
mapping results to gRPC status codes lives here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from types import MappingProxyType
from typing import Any

import grpc

import accord.v1 as pb
from participants._service import ParticipantService
from participants._telemetry import ParticipantTelemetry
from participants._types import _EMPTY, BranchCall, Op, Result, Status
from registry.telemetry import attach_span, bind_gid

log = logging.getLogger("accord.participant")

#: The participant result contract (DESIGN, participant.proto).
_CODES: dict[Status, grpc.StatusCode] = {
    Status.REFUSED: grpc.StatusCode.ABORTED,
    Status.NOT_YET: grpc.StatusCode.FAILED_PRECONDITION,
    Status.FENCED: grpc.StatusCode.FAILED_PRECONDITION,
    Status.CONFLICT: grpc.StatusCode.FAILED_PRECONDITION,
    Status.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Status.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
}

_TRACE_KEYS = frozenset({"traceparent", "tracestate"})


def to_call(request: pb.BranchRequest, metadata: Iterable[tuple[str, Any]] | None) -> BranchCall:
    """A BranchRequest as a plain value. The trace context comes from the request, or
    else from the call's gRPC metadata."""
    trace: dict[str, str] | None = None
    if request.trace_context:
        trace = dict(request.trace_context)
    if metadata and (trace is None or not trace.get("traceparent")):
        for key, value in metadata:
            if key in _TRACE_KEYS and isinstance(value, str):
                if trace is None:
                    trace = {}
                trace.setdefault(key, value)
    return BranchCall(
        gid=request.gid,
        branch_id=request.branch_id,
        operation=request.operation,
        payload=request.payload,
        shard=request.shard,
        epoch=request.epoch,
        coordinator_address=request.coordinator_address,
        one_phase=request.one_phase,
        # No trace context (the usual case): the shared empty mapping, no dict built.
        trace_context=_EMPTY if trace is None else MappingProxyType(trace),
    )


class ParticipantServicer(pb.ParticipantServicer):
    def __init__(
        self, service: ParticipantService, telemetry: ParticipantTelemetry | None = None
    ) -> None:
        self._service = service
        self._tel = telemetry or ParticipantTelemetry(
            None, service=service.service, db=service.store.path
        )

    async def Prepare(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return await self._handle(Op.PREPARE, request, context)

    async def Commit(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return await self._handle(Op.COMMIT, request, context)

    async def Abort(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return await self._handle(Op.ABORT, request, context)

    async def Execute(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return await self._handle(Op.EXECUTE, request, context)

    async def Compensate(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return await self._handle(Op.COMPENSATE, request, context)

    async def _handle(self, op: Op, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        call = to_call(request, context.invocation_metadata())
        tel = self._tel
        t0 = time.monotonic_ns()
        span = tel.start(op, call)
        if span is not None:
            # This handler's task: its log lines carry the gid and the trace.
            bind_gid(call.gid)
            attach_span(span)
        result: Result | None = None
        try:
            result = await self._service.call(op, call)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The traceback goes to the log, never to the caller; INTERNAL is retryable.
            log.exception(
                "event=%s gid=%s branch=%s status=INTERNAL", op.value, call.gid, call.branch_id
            )
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details(f"{op.value} failed: internal error in the participant")
            return pb.BranchResponse()
        finally:
            tel.done(span, op, result, t0)
        if result.status is Status.OK:
            return pb.BranchResponse(
                read_only=result.read_only, message=result.message, result=result.result
            )
        # set_code rather than context.abort(): no exception on the hot path of a no vote.
        context.set_code(_CODES[result.status])
        context.set_details(result.message)
        return pb.BranchResponse(message=result.message)
