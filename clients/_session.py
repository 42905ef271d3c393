"""The client's streaming path: Execute, StartSaga, Commit and Abort calls over one
``Coordinator/Session`` stream per coordinator (coordinator.proto documents it).

A unary call costs each end about 0.35 ms of CPU; on the stream a call is one message
each way. :class:`SessionStub` stands where the ``CoordinatorStub`` stood: its four
session methods take the unary signature (``request, timeout=``) and return the unary
response or raise an :class:`grpc.aio.AioRpcError` with the unary status, so everything
above it (error mapping, a sharded client's refresh after UNAVAILABLE, a caller's retry
with its idempotency key) is the same on both paths. It chooses per call:

- ``mode="unary"``: never the stream; ``"session"``: always (for those four methods);
  ``"auto"``: the stream once ``threshold`` or more calls are in flight through it, so
  a client with one call at a time stays on plain unary calls;
- beyond :data:`MAX_SESSION_CALLS` in flight on the session, a call goes unary; one the
  coordinator refuses for its own (lower) per-session limit is sent again unary (it
  did not run);
- a request near the message size limit goes unary (a message over the limit would end
  the stream, failing every call on it; unary it fails alone, as it always did).

:class:`Session` keeps the call-id bookkeeping: a call is a future in ``pending`` under a
fresh id, answered by id (out of order) by the reader task; a writer task sends every
call queued since its last write as one message (a batch, cut at about
:data:`BATCH_BYTES`: a stream message costs grpc.aio much of what a unary call costs, so
one message per call would save little). A call's ``timeout`` is kept here (DEADLINE_EXCEEDED, as gRPC says it); a late
answer is dropped. When the stream ends, every call still pending fails:

- calls never handed to the stream (queued behind the break) are sent again, unary:
  they cannot have reached the coordinator;
- the coordinator has no ``Session`` (UNIMPLEMENTED: an older coordinator): every
  pending call is sent unary, and this stub stays unary;
- UNAUTHENTICATED (the stream's token was refused when it opened): that status;
- anything else (the coordinator died, restarted, stopped, the connection broke):
  UNAVAILABLE, as a unary call would fail; the next call opens a new stream.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from typing import Any, cast

import grpc
from grpc import aio
from opentelemetry import trace
from opentelemetry.trace import SpanKind

import accord.v1 as pb
from accord.common.telemetry import current_metadata
from accord.common.transport import MAX_MESSAGE_BYTES

log = logging.getLogger("accord.client")

#: The ways a client sends its Execute/StartSaga/Commit/Abort calls.
MODES = ("auto", "unary", "session")
#: ``auto`` uses the stream once this many calls are in flight (the call included).
DEFAULT_THRESHOLD = 8
#: A request larger than this goes unary (the stream's message limit is the unary one).
MAX_SESSION_REQUEST_BYTES = MAX_MESSAGE_BYTES - 64 * 1024

#: At most this many calls in flight on one session (the coordinator's default limit);
#: more go unary.
MAX_SESSION_CALLS = 1024
#: How the coordinator's refusal for its per-session limit begins (coordinator.proto).
SESSION_LIMIT_PREFIX = "session limit:"

#: A request message is sent once it holds about this many bytes.
BATCH_BYTES = 1024 * 1024

#: The session methods: the unary method's name -> the ``SessionRequest`` field.
FIELDS = {
    "Execute": "execute",
    "StartSaga": "start_saga",
    "Commit": "commit",
    "Abort": "abort",
}


def rpc_error(code: grpc.StatusCode, details: str) -> aio.AioRpcError:
    """An error as a unary call with that status raises it."""
    return aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), details)


class _NotSent(Exception):
    """The call was never handed to the stream: sending it unary is safe."""


class Session:
    """One ``Session`` stream on ``stub`` (the plain generated stub of a channel). Opened
    by the first :meth:`call`, made inside a running loop; :meth:`close` when done."""

    def __init__(self, stub: Any, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self._loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        #: Calls awaiting their answer, by call id.
        self.pending: dict[int, asyncio.Future[pb.SessionResult]] = {}
        #: Calls not yet handed to the stream (with their sizes).
        self._queue: list[tuple[pb.SessionCall, int]] = []
        self._wake = asyncio.Event()
        #: Why the stream ended (None while it works): a broken session takes no call.
        self.broken: str | None = None
        #: The coordinator has no Session (UNIMPLEMENTED).
        self.unsupported = False
        self.calls_sent = 0
        self.messages_sent = 0
        self._call: Any = stub.Session(metadata=tuple(metadata) or None)
        self._reader = self._loop.create_task(self._read())
        self._writer = self._loop.create_task(self._write())

    async def call(
        self, field: str, request: Any, timeout_s: float | None, trace_md: Any = None
    ) -> pb.TransactionResponse:
        """Sends ``request`` as the ``field`` of a new call and waits for its answer.
        Raises the unary call's :class:`aio.AioRpcError`, or :class:`_NotSent`."""
        if self.broken is not None:
            raise _NotSent(self.broken)
        call_id = next(self._ids)
        msg = pb.SessionCall(call_id=call_id)
        getattr(msg, field).CopyFrom(request)
        if trace_md:
            for k, v in trace_md:
                if k == "traceparent":
                    msg.traceparent = v
                elif k == "tracestate":
                    msg.tracestate = v
        fut: asyncio.Future[pb.SessionResult] = self._loop.create_future()
        self.pending[call_id] = fut
        self._queue.append((msg, request.ByteSize()))
        self._wake.set()
        timer = (
            self._loop.call_later(timeout_s, self._expire, call_id)
            if timeout_s is not None
            else None
        )
        try:
            answer = await fut
        finally:
            if timer is not None:
                timer.cancel()
            self.pending.pop(call_id, None)
        if answer.HasField("error"):
            e = answer.error
            code = _code(e.code)
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.message.startswith(
                SESSION_LIMIT_PREFIX
            ):
                raise _NotSent(e.message)  # the session's own limit: the call did not run
            raise rpc_error(code, e.message)
        return answer.response

    def _expire(self, call_id: int) -> None:
        fut = self.pending.pop(call_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

    async def _write(self) -> None:
        call = self._call
        try:
            while True:
                await self._wake.wait()
                # One more loop iteration: the callers woken by the same event (a
                # response batch) join this message instead of the next one.
                await asyncio.sleep(0)
                self._wake.clear()
                queue, self._queue = self._queue, []
                pending = self.pending
                batches: list[list[tuple[pb.SessionCall, int]]] = [[]]
                size = 0
                for entry in queue:
                    if entry[0].call_id not in pending:
                        continue  # expired before it went out
                    if size and size + entry[1] > BATCH_BYTES:
                        batches.append([])
                        size = 0
                    batches[-1].append(entry)
                    size += entry[1]
                for i, batch in enumerate(batches):
                    if not batch:
                        continue
                    try:
                        await call.write(pb.SessionRequest(calls=[m for m, _ in batch]))
                    except BaseException:
                        # Those after it were never handed over; it may have been.
                        self._queue[:0] = [e for b in batches[i + 1 :] for e in b]
                        raise
                    self.messages_sent += 1
                    self.calls_sent += len(batch)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # The RPC ended: the reader learns its status; give it a moment.
            await asyncio.wait([self._reader], timeout=1.0)
            self._break(grpc.StatusCode.UNAVAILABLE, f"write failed: {e!r}")

    async def _read(self) -> None:
        call = self._call
        pending = self.pending
        try:
            while True:
                msg = await call.read()
                if msg is aio.EOF:
                    self._break(grpc.StatusCode.UNAVAILABLE, "the coordinator ended the session")
                    return
                for result in msg.results:
                    fut = pending.pop(result.call_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(result)
        except asyncio.CancelledError:
            if self.broken is None:
                self._break(grpc.StatusCode.UNAVAILABLE, "session cancelled")
            raise
        except aio.AioRpcError as e:
            self._break(e.code(), e.details() or "")
        except Exception as e:
            self._break(grpc.StatusCode.UNAVAILABLE, repr(e))

    def _break(self, code: grpc.StatusCode, why: str) -> None:
        """Ends the session for good; every pending call fails (see the module's
        docstring for how)."""
        if self.broken is not None:
            return
        self.broken = f"session broken: {code.name}: {why}"
        self.unsupported = code == grpc.StatusCode.UNIMPLEMENTED
        pending, self.pending = self.pending, {}
        unsent = {m.call_id for m, _ in self._queue}
        self._queue = []
        if pending:
            log.info("event=session_broken pending=%d why=%r", len(pending), self.broken)
        if code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED):
            code, why = grpc.StatusCode.UNAVAILABLE, self.broken
        for call_id, fut in pending.items():
            if fut.done():
                continue
            if call_id in unsent or self.unsupported:
                fut.set_exception(_NotSent(self.broken))
            else:
                fut.set_exception(rpc_error(code, why))
        self._call.cancel()
        current = asyncio.current_task()
        for task in (self._reader, self._writer):
            if task is not current:
                task.cancel()

    async def close(self) -> None:
        self._break(grpc.StatusCode.UNAVAILABLE, "the client closed it")
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)


def _code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


class SessionStub:
    """A ``CoordinatorStub`` whose Execute, StartSaga, Commit and Abort may travel on a
    :class:`Session` (see the module docstring); every other method is ``unary``'s.

    ``unary``: the stub for unary calls (token and tracing wrappers included); ``raw``:
    the channel's plain generated stub (the session's stream); ``metadata``: sent when
    the stream opens (the bearer token); ``tracer``: client spans for session calls
    (None: not traced)."""

    def __init__(
        self,
        unary: Any,
        raw: Any,
        *,
        mode: str = "auto",
        threshold: int = DEFAULT_THRESHOLD,
        metadata: Sequence[tuple[str, str]] = (),
        tracer: trace.Tracer | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"session mode must be one of {', '.join(MODES)}, not {mode!r}")
        if threshold < 1:
            raise ValueError(f"session threshold must be >= 1, not {threshold}")
        self._unary = unary
        self._raw = raw
        self.mode = mode
        self.threshold = threshold
        self._metadata = tuple(metadata)
        self._tracer = tracer
        self.session: Session | None = None
        #: Session calls in flight through this stub (either path).
        self.inflight = 0
        #: Calls sent on a session (for tests and logs).
        self.session_calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._unary, name)

    async def Execute(self, request: pb.ExecuteRequest, **kw: Any) -> pb.TransactionResponse:
        return await self._call("Execute", request, kw)

    async def StartSaga(self, request: pb.StartSagaRequest, **kw: Any) -> pb.TransactionResponse:
        return await self._call("StartSaga", request, kw)

    async def Commit(self, request: pb.CommitRequest, **kw: Any) -> pb.TransactionResponse:
        return await self._call("Commit", request, kw)

    async def Abort(self, request: pb.AbortRequest, **kw: Any) -> pb.TransactionResponse:
        return await self._call("Abort", request, kw)

    def _use_session(self, request: Any) -> bool:
        if self.mode == "unary" or (self.mode == "auto" and self.inflight < self.threshold):
            return False
        s = self.session
        if s is not None and (s.unsupported or len(s.pending) >= MAX_SESSION_CALLS):
            return False
        return bool(request.ByteSize() <= MAX_SESSION_REQUEST_BYTES)

    def _open(self) -> Session:
        s = self.session
        if s is None or s.broken is not None:
            if s is not None and s.unsupported:
                return s
            s = self.session = Session(self._raw, self._metadata)
        return s

    async def _call(self, name: str, request: Any, kw: dict[str, Any]) -> pb.TransactionResponse:
        self.inflight += 1
        try:
            if self._use_session(request):
                try:
                    return await self._on_session(name, request, kw.get("timeout"))
                except _NotSent:
                    pass  # never reached the coordinator: unary is safe
            return cast(pb.TransactionResponse, await getattr(self._unary, name)(request, **kw))
        finally:
            self.inflight -= 1

    async def _on_session(
        self, name: str, request: Any, timeout_s: float | None
    ) -> pb.TransactionResponse:
        session = self._open()
        self.session_calls += 1
        if self._tracer is None:
            return await session.call(FIELDS[name], request, timeout_s)
        with self._tracer.start_as_current_span(
            f"accord.client {name}", kind=SpanKind.CLIENT
        ) as span:
            gid = getattr(request, "gid", "")
            if gid:
                span.set_attribute("accord.gid", gid)
            response = await session.call(FIELDS[name], request, timeout_s, current_metadata())
            txn = response.transaction
            if txn.gid:
                span.set_attribute("accord.gid", txn.gid)
                span.set_attribute("accord.state", txn.state)
            return response

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
