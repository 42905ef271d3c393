"""``Coordinator/Session``: a client's Execute, StartSaga, Commit and Abort calls over one
bidirectional stream (coordinator.proto documents the contract).

A unary grpc.aio call costs each end about 0.35 ms of CPU, more than the engine's own
work on a transaction; on a stream a call is one message each way. Per stream:

- the caller is authenticated from the stream's metadata when it opens (a token that
  does not pass ends the stream UNAUTHENTICATED at once), and again at most every
  :data:`REAUTH_EVERY_S` while it lasts, so a revoked or expired token stops working
  on an open session as it would on new unary calls (each later call UNAUTHENTICATED);
- every call checks the caller's roles and runs the engine exactly as the unary RPC
  does (:class:`CallRunner`), so it ends with the same status code and message;
- a request message carries a batch of calls; they run concurrently, one task each,
  and are answered as they finish: every answer ready when the writer wakes goes out
  in one response message (cut at about :data:`BATCH_BYTES`), since a stream message
  costs grpc.aio a good part of what a unary call costs;
- at most ``Limits.max_session_calls`` calls are in flight per stream: a call beyond it
  is answered RESOURCE_EXHAUSTED alone, the others go on;
- each call may carry its W3C trace context (``traceparent``), made current for its
  task, so the transaction is a child of the client's span for that call;
- when the client goes away (the stream is cancelled), the calls in flight are
  cancelled as unary handlers would be; the engine carries on with what it has logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from opentelemetry import context as otel_context

import accord.v1 as pb
from accord.common.auth import (
    ANONYMOUS,
    Authenticator,
    PermissionDenied,
    Principal,
    Role,
    Unauthenticated,
)
from accord.common.telemetry import context_from_traceparent
from accord.coordinator._engine import Engine
from accord.coordinator._errors import AccordError, InvalidArgument, ResourceExhausted
from accord.coordinator._specs import branch_from_pb, saga_from_pb

log = logging.getLogger("accord.coordinator")

#: A response message is sent once it holds about this many bytes (the limit is 4 MiB).
BATCH_BYTES = 1024 * 1024
#: An open session re-checks its token at most this often (seconds).
REAUTH_EVERY_S = 1.0

_INTERNAL = "internal error (see the coordinator's log)"
#: How a refusal for the session's own limit begins: the call did not run, so a client
#: may send it again (unary, or later) without an idempotency key.
SESSION_LIMIT_PREFIX = "session limit:"


class CallFailed(Exception):
    """A session call's failure: the status the unary RPC would have ended with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class CallRunner:
    """Runs one session call the way the unary handler of its method does (roles, caller
    scoping, engine call); raises :class:`CallFailed` with the unary RPC's status."""

    def __init__(
        self,
        engine: Engine,
        status_for: Callable[[AccordError], grpc.StatusCode],
        *,
        traced: bool = False,
    ) -> None:
        self._e = engine
        self._status_for = status_for
        self._traced = traced

    async def run(self, request: pb.SessionCall, p: Principal) -> pb.TransactionResponse:
        try:
            p.require(Role.CLIENT)
            if self._traced and request.traceparent:
                parent = context_from_traceparent(request.traceparent, request.tracestate)
                if parent is not None:
                    otel_context.attach(parent)  # this call's task only
            return pb.TransactionResponse(transaction=(await self._dispatch(request, p)).to_pb())
        except AccordError as e:
            raise CallFailed(self._status_for(e), str(e)) from None
        except PermissionDenied as e:
            raise CallFailed(grpc.StatusCode.PERMISSION_DENIED, str(e)) from None
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("event=internal_error rpc=Session")
            raise CallFailed(grpc.StatusCode.INTERNAL, _INTERNAL) from None

    async def _dispatch(self, request: pb.SessionCall, p: Principal) -> Any:
        e = self._e
        kind = request.WhichOneof("call")
        if kind == "execute":
            r = request.execute
            return await e.execute(
                key=r.idempotency_key,
                timeout_ms=r.timeout_ms,
                branches=[branch_from_pb(b) for b in r.branches],
                caller=p.caller,
            )
        if kind == "start_saga":
            s = request.start_saga
            return await e.start_saga(
                key=s.idempotency_key,
                timeout_ms=s.timeout_ms,
                definition=saga_from_pb(s.definition),
                wait=s.wait,
                caller=p.caller,
            )
        if kind == "commit":
            gid = request.commit.gid
            if not p.has(Role.ADMIN):
                e.get(gid, caller=p.caller)  # another caller's gid: NOT_FOUND
            return await e.commit(gid)
        if kind == "abort":
            a = request.abort
            if not p.has(Role.ADMIN):
                e.get(a.gid, caller=p.caller)
            return await e.abort(a.gid, a.reason)
        raise InvalidArgument("a session call needs one of execute, start_saga, commit or abort")


class Caller:
    """The stream's caller, re-checked from its metadata at most every
    :data:`REAUTH_EVERY_S`."""

    def __init__(
        self,
        auth: Authenticator | None,
        metadata: Iterable[tuple[str, Any]] | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._auth = auth
        self._metadata = tuple(metadata or ())
        self._clock = clock
        self._checked = clock()
        self._principal: Principal = ANONYMOUS
        self._refused = ""
        if auth is not None:
            # At open a bad token ends the stream (Unauthenticated propagates).
            self._principal = auth.from_metadata(self._metadata)

    def current(self) -> Principal:
        """The caller now; :class:`CallFailed` (UNAUTHENTICATED) once its token no longer
        passes."""
        if self._auth is not None and self._clock() - self._checked >= REAUTH_EVERY_S:
            self._checked = self._clock()
            try:
                self._principal = self._auth.from_metadata(self._metadata)
                self._refused = ""
            except Unauthenticated as e:
                self._refused = str(e)
        if self._refused:
            raise CallFailed(grpc.StatusCode.UNAUTHENTICATED, self._refused)
        return self._principal


class Session:
    """One open ``Session`` stream (see the module docstring)."""

    def __init__(
        self,
        runner: CallRunner,
        caller: Caller,
        *,
        max_calls: int,
    ) -> None:
        self._runner = runner
        self._caller = caller
        self._max_calls = max_calls
        self._loop = asyncio.get_running_loop()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._ready: list[pb.SessionResult] = []
        self._wake = asyncio.Event()
        self._reading = True

    async def serve(
        self, requests: AsyncIterator[pb.SessionRequest]
    ) -> AsyncIterator[pb.SessionResponse]:
        """The answers, as the calls end; ends once the client has half-closed and every
        call is answered. Closing it (the client went away) cancels the calls."""
        reader = self._loop.create_task(self._read(requests))
        try:
            while True:
                await self._wake.wait()
                # One more loop iteration: calls ending on the same event (a WAL group
                # commit, a batch of participant results) share the message.
                await asyncio.sleep(0)
                self._wake.clear()
                ready, self._ready = self._ready, []
                batch = pb.SessionResponse()
                size = 0
                for result in ready:
                    n = result.ByteSize()
                    if size and size + n > BATCH_BYTES:
                        yield batch
                        batch = pb.SessionResponse()
                        size = 0
                    batch.results.append(result)
                    size += n
                if batch.results:
                    yield batch
                if not self._reading and not self._tasks and not self._ready:
                    return
        finally:
            reader.cancel()
            tasks = list(self._tasks.values())
            for t in tasks:
                t.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[pb.SessionRequest]) -> None:
        try:
            async for request in requests:
                for call in request.calls:
                    self._start(call)
        finally:
            self._reading = False
            self._wake.set()

    def _start(self, request: pb.SessionCall) -> None:
        call_id = request.call_id
        if call_id in self._tasks:
            self._answer_error(
                call_id,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"call_id {call_id} is already in flight on this session",
            )
            return
        if len(self._tasks) >= self._max_calls:
            e = ResourceExhausted(
                f"{SESSION_LIMIT_PREFIX} this session has {len(self._tasks)} calls in flight (limit "
                f"{self._max_calls} per session: open another session, or wait for answers)"
            )
            self._answer_error(call_id, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            return
        try:
            p = self._caller.current()
        except CallFailed as f:
            self._answer_error(call_id, f.code, f.message)
            return
        self._tasks[call_id] = self._loop.create_task(self._call(call_id, request, p))

    async def _call(self, call_id: int, request: pb.SessionCall, p: Principal) -> None:
        try:
            response = await self._runner.run(request, p)
        except CallFailed as f:
            self._answer_error(call_id, f.code, f.message)
        else:
            self._answer(pb.SessionResult(call_id=call_id, response=response))
        finally:
            self._tasks.pop(call_id, None)
            if not self._tasks and not self._reading:
                self._wake.set()

    def _answer_error(self, call_id: int, code: grpc.StatusCode, message: str) -> None:
        self._answer(
            pb.SessionResult(
                call_id=call_id, error=pb.CallStatus(code=code.value[0], message=message)
            )
        )

    def _answer(self, response: pb.SessionResult) -> None:
        self._ready.append(response)
        self._wake.set()
