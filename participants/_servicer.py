"""The accord.v1.Participant gRPC servicer: a thin translation between protobuf and the
transport-neutral :class:`~accord.participants._service.ParticipantService`. The one table
mapping results to gRPC status codes lives here.

Two transports, one handling path (:meth:`ParticipantServicer.handle`: barrier, fencing,
span, metrics): the unary RPCs, and ``Stream``, where one long-lived bidirectional stream
per coordinator carries batches of calls (:class:`_StreamSession`). A unary round trip
costs a Python process about 0.25 ms of CPU, more than the call's own work; a stream
pays that per batch."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Iterable
from types import MappingProxyType
from typing import Any

import grpc

import accord.v1 as pb
from accord.common.telemetry import attach_span, bind_gid
from accord.participants._service import ParticipantService
from accord.participants._telemetry import ParticipantTelemetry
from accord.participants._types import _EMPTY, BranchCall, Op, Result, Status

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


#: Calls in flight (being handled) on one stream; a call beyond it is answered
#: RESOURCE_EXHAUSTED (retryable) at once. The store group-commits many calls per fsync,
#: so a few hundred in flight keep it busy; the bound keeps one coordinator from
#: queueing unbounded work.
DEFAULT_STREAM_MAX_INFLIGHT = 1024
#: A result batch is sent once it holds about this many bytes (the gRPC message limit is
#: 4 MiB; a saga step's result bytes may be large).
_BATCH_BYTES = 1024 * 1024

_METHODS: dict[int, Op] = {
    pb.BRANCH_METHOD_PREPARE: Op.PREPARE,
    pb.BRANCH_METHOD_COMMIT: Op.COMMIT,
    pb.BRANCH_METHOD_ABORT: Op.ABORT,
    pb.BRANCH_METHOD_EXECUTE: Op.EXECUTE,
    pb.BRANCH_METHOD_COMPENSATE: Op.COMPENSATE,
}

_OK = grpc.StatusCode.OK
_INTERNAL = grpc.StatusCode.INTERNAL

#: One call's answer: the gRPC status it ends with, its details, the response.
Answer = tuple[grpc.StatusCode, str, pb.BranchResponse]


class ParticipantServicer(pb.ParticipantServicer):
    def __init__(
        self,
        service: ParticipantService,
        telemetry: ParticipantTelemetry | None = None,
        *,
        stream_max_inflight: int = DEFAULT_STREAM_MAX_INFLIGHT,
    ) -> None:
        self._service = service
        self._tel = telemetry or ParticipantTelemetry(None, service=service.service)
        self.stream_max_inflight = stream_max_inflight
        self._sessions: set[_StreamSession] = set()
        self._closing = False

    async def Prepare(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return await self._unary(Op.PREPARE, request, context)

    async def Commit(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return await self._unary(Op.COMMIT, request, context)

    async def Abort(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return await self._unary(Op.ABORT, request, context)

    async def Execute(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return await self._unary(Op.EXECUTE, request, context)

    async def Compensate(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return await self._unary(Op.COMPENSATE, request, context)

    async def Stream(
        self, request_iterator: AsyncIterator[pb.BranchBatch], context: Any
    ) -> AsyncIterator[pb.BranchResultBatch]:
        if self._closing:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("participant is shutting down")
            return
        session = _StreamSession(self, self.stream_max_inflight)
        self._sessions.add(session)
        try:
            async for batch in session.run(request_iterator):
                yield batch
        finally:
            self._sessions.discard(session)
        if self._closing:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("participant is shutting down")

    def shutdown(self) -> None:
        """Server shutdown: every stream stops reading, answers what it has in flight
        and ends (UNAVAILABLE), so the coordinators reopen elsewhere or later; new
        streams are refused."""
        self._closing = True
        for session in list(self._sessions):
            session.stop()

    async def _unary(self, op: Op, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        code, details, response = await self.handle(
            op, to_call(request, context.invocation_metadata())
        )
        if code is not _OK:
            # set_code rather than context.abort(): no exception on the hot path of a no.
            context.set_code(code)
            context.set_details(details)
        return response

    async def handle(self, op: Op, call: BranchCall, transport: str = "unary") -> Answer:
        """One call, whatever the transport: the span (a child of the caller's context),
        the service (barrier, fencing), the metrics, and the answer."""
        tel = self._tel
        t0 = time.monotonic_ns()
        span = tel.start(op, call, transport)
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
            return (
                _INTERNAL,
                f"{op.value} failed: internal error in the participant",
                pb.BranchResponse(),
            )
        finally:
            tel.done(span, op, result, t0)
        if result.status is Status.OK:
            return (
                _OK,
                "",
                pb.BranchResponse(
                    read_only=result.read_only, message=result.message, result=result.result
                ),
            )
        return _CODES[result.status], result.message, pb.BranchResponse(message=result.message)


class _StreamSession:
    """One ``Stream`` RPC: a reader task dispatches every call of every batch as its own
    task through :meth:`ParticipantServicer.handle`; the RPC's own task writes the
    results, coalesced: whatever completed since the last write goes out as one batch
    (so results that complete in one event-loop tick share a batch)."""

    def __init__(self, servicer: ParticipantServicer, max_inflight: int) -> None:
        self._servicer = servicer
        self._max_inflight = max_inflight
        self._tasks: set[asyncio.Task[Answer]] = set()
        self._out = pb.BranchResultBatch()
        self._out_bytes = 0
        self._full: list[pb.BranchResultBatch] = []
        self._wake = asyncio.Event()
        self._reading = True
        self._reader: asyncio.Task[None] | None = None

    async def run(
        self, requests: AsyncIterator[pb.BranchBatch]
    ) -> AsyncIterator[pb.BranchResultBatch]:
        """The result batches to write, until the client half-closes (or :meth:`stop`)
        and every call read has been answered."""
        self._reader = asyncio.get_running_loop().create_task(self._read(requests))
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                for batch in self._take():
                    yield batch
                if not self._reading and not self._tasks and not self._out.results:
                    break
        finally:
            self._reader.cancel()
            for task in list(self._tasks):
                task.cancel()

    def stop(self) -> None:
        """Stop reading; the calls in flight are still answered, then the RPC ends."""
        # Set here too: a reader cancelled before it first ran never runs its finally.
        self._reading = False
        self._wake.set()
        if self._reader is not None:
            self._reader.cancel()

    async def _read(self, requests: AsyncIterator[pb.BranchBatch]) -> None:
        try:
            async for batch in requests:
                for c in batch.calls:
                    self._dispatch(c)
        except asyncio.CancelledError:
            pass  # stop(): the calls in flight are still answered
        except Exception as e:  # the client went away: nothing left to answer
            log.debug("event=stream_read_failed error=%s", e)
        finally:
            self._reading = False
            self._wake.set()

    def _dispatch(self, c: pb.BatchedCall) -> None:
        op = _METHODS.get(c.method)
        if op is None:
            self._answer(c.id, grpc.StatusCode.INVALID_ARGUMENT, f"unknown method {c.method}", None)
            return
        if len(self._tasks) >= self._max_inflight:
            self._answer(
                c.id,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than {self._max_inflight} calls in flight on this stream",
                None,
            )
            return
        # No stream metadata: the trace context travels in each request.
        task = asyncio.get_running_loop().create_task(
            self._servicer.handle(op, to_call(c.request, None), "stream")
        )
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._done, c.id))

    def _done(self, call_id: int, task: asyncio.Task[Answer]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            exc = task.exception()
            if exc is None:
                code, details, response = task.result()
                self._answer(call_id, code, details, response)
            else:  # handle() answers INTERNAL itself: this is a bug, logged
                log.error("event=stream_call_failed error=%r", exc)
                self._answer(call_id, _INTERNAL, "internal error in the participant", None)
        if not self._reading and not self._tasks:
            self._wake.set()

    def _answer(
        self,
        call_id: int,
        code: grpc.StatusCode,
        details: str,
        response: pb.BranchResponse | None,
    ) -> None:
        size = 64 + len(details)
        if response is not None:
            size += len(response.result) + len(response.message)
        if self._out.results and self._out_bytes + size > _BATCH_BYTES:
            self._full.append(self._out)
            self._out = pb.BranchResultBatch()
            self._out_bytes = 0
        self._out_bytes += size
        self._out.results.add(id=call_id, code=code.value[0], message=details, response=response)
        self._wake.set()

    def _take(self) -> list[pb.BranchResultBatch]:
        batches = self._full
        if self._out.results:
            batches.append(self._out)
            self._out = pb.BranchResultBatch()
            self._out_bytes = 0
        self._full = []
        return batches
