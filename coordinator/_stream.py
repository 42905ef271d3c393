"""The stream transport to one participant address: many branch calls multiplexed over
one long-lived ``accord.v1.Participant/Stream`` (participant.proto).

A unary grpc.aio round trip costs a Python process about 0.25 ms of CPU on each side,
more than a branch call's own work; a stream pays that per batch. Per address, one
:class:`ParticipantStream`:

- is opened lazily (by :class:`~accord.coordinator._calls.ParticipantCalls`, on the first call);
  its writer sends nothing until ``connect`` says the channel is connected;
- queues each call with a future and its deadline; a writer task sends everything
  queued since its last write as one batch (all calls made in one event-loop tick go
  out together), a batch being cut at about ``BATCH_BYTES``;
- has a reader task that resolves futures by call id;
- answers a call whose deadline passes as a unary call would (DEADLINE_EXCEEDED); a
  late result for it is dropped;
- when the stream breaks (the participant died, restarted, shut down), fails every call
  pending on it as UNAVAILABLE, so the engine's ordinary retry and failover apply, and
  is never used again: the next call opens a new stream;
- knows which calls were never handed to the stream (queued while it was being opened,
  or behind a write that failed): those fail with :class:`CallNotSent` instead, since
  they cannot have reached the participant; a call whose deadline passes while it is
  still queued is taken out of its batch first, so it never goes out later;
- when the participant answers UNIMPLEMENTED (it has no ``Stream``), fails every
  pending call with :class:`StreamUnsupported`, which the caller turns into unary calls.

No task is made per call: a call is a future, a deadline timer and a slot in a batch.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc import aio

import accord.v1 as pb
from accord.coordinator._methods import Method

log = logging.getLogger("accord.coordinator.calls")

#: A batch is sent once it holds about this many bytes (the gRPC message limit is
#: 4 MiB on every link; a payload may be 256 KiB).
BATCH_BYTES = 1024 * 1024
#: Bytes counted per call on top of its payload (ids, gid, operation, trace context).
_CALL_OVERHEAD = 256

METHOD_NUMBERS: dict[Method, int] = {
    Method.PREPARE: pb.BRANCH_METHOD_PREPARE,
    Method.COMMIT: pb.BRANCH_METHOD_COMMIT,
    Method.ABORT: pb.BRANCH_METHOD_ABORT,
    Method.EXECUTE: pb.BRANCH_METHOD_EXECUTE,
    Method.COMPENSATE: pb.BRANCH_METHOD_COMPENSATE,
}


class StreamUnsupported(Exception):
    """The participant has no ``Stream`` (it answered UNIMPLEMENTED)."""


class CallNotSent(Exception):
    """The call failed before it was handed to the stream (the stream could not be
    opened, or broke first): it cannot have reached the participant."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ParticipantStream:
    """One open ``Stream`` to ``address``; see the module docstring. Make it inside a
    running event loop; :meth:`close` when done."""

    def __init__(
        self,
        stub: pb.ParticipantStub,
        address: str,
        *,
        on_unsupported: Callable[[ParticipantStream], None] | None = None,
        connect: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        """``connect``: waits until the channel is connected; None when it is, else why
        it cannot be (the stream then ends with every call not sent). Without it the
        first batch is written at once (gRPC holds it until a connection is made, so a
        failure then cannot tell whether it went out)."""
        self.address = address
        #: Why the stream ended (None while it works). A broken stream takes no calls.
        self.broken: str | None = None
        self.unsupported = False
        #: Batches written, calls written (for tests and logs).
        self.batches_sent = 0
        self.calls_sent = 0
        self._on_unsupported = on_unsupported
        self._connect = connect
        self._loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[pb.BatchedResult]] = {}
        self._batch = pb.BranchBatch()
        self._batch_bytes = 0
        self._full: list[pb.BranchBatch] = []
        #: Ids of the calls queued in ``_batch`` or ``_full``: not handed to the stream.
        self._unsent: set[int] = set()
        self._wake = asyncio.Event()
        self._call: aio.StreamStreamCall = stub.Stream()
        self._reader = self._loop.create_task(self._read())
        self._writer = self._loop.create_task(self._write())

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def call(
        self,
        method: int,
        request: pb.BranchRequest,
        timeout_s: float,
        trace: Sequence[tuple[str, str]] | None = None,
    ) -> pb.BatchedResult:
        """Sends one call and waits for its result: the participant's, or one made here
        (DEADLINE_EXCEEDED when ``timeout_s`` passes, UNAVAILABLE when the stream
        breaks). Raises :class:`StreamUnsupported` when the participant has no Stream.
        ``request`` is copied into the batch, never changed; ``trace`` (the W3C trace
        context) goes into the copy's ``trace_context``."""
        if self.unsupported:
            raise StreamUnsupported(self.address)
        if self.broken is not None:
            raise CallNotSent(grpc.StatusCode.UNAVAILABLE, self.broken)
        call_id = next(self._ids)
        size = len(request.payload) + _CALL_OVERHEAD
        if self._batch_bytes and self._batch_bytes + size > BATCH_BYTES:
            self._full.append(self._batch)
            self._batch = pb.BranchBatch()
            self._batch_bytes = 0
        self._batch_bytes += size
        entry = self._batch.calls.add(id=call_id, method=method, request=request)
        self._unsent.add(call_id)
        if trace:
            tc = entry.request.trace_context
            for key, value in trace:
                tc[key] = value
        fut: asyncio.Future[pb.BatchedResult] = self._loop.create_future()
        self._pending[call_id] = fut
        self._wake.set()
        timer = self._loop.call_later(timeout_s, self._expire, call_id, timeout_s)
        try:
            return await fut
        finally:
            timer.cancel()
            self._pending.pop(call_id, None)

    def _expire(self, call_id: int, timeout_s: float) -> None:
        fut = self._pending.pop(call_id, None)
        if fut is None or fut.done():
            return
        if self._unqueue(call_id):
            fut.set_exception(
                CallNotSent(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"not sent within {timeout_s:.3g} s: the stream to {self.address} was not open",
                )
            )
            return
        fut.set_result(
            self._failure(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer within {timeout_s:.3g} s on the stream",
            )
        )

    def _unqueue(self, call_id: int) -> bool:
        """Takes a call not yet handed to the stream out of its batch; False when it was
        handed over already."""
        if call_id not in self._unsent:
            return False
        self._unsent.discard(call_id)
        for batch in (self._batch, *self._full):
            for i, entry in enumerate(batch.calls):
                if entry.id == call_id:
                    del batch.calls[i]
                    return True
        raise AssertionError(f"call {call_id} queued but in no batch")  # pragma: no cover

    @staticmethod
    def _failure(code: grpc.StatusCode, message: str) -> pb.BatchedResult:
        return pb.BatchedResult(code=code.value[0], message=message)

    async def _write(self) -> None:
        call = self._call
        try:
            if self._connect is not None:
                why = await self._connect()
                if why is not None:
                    self._break(f"not opened: {why}")
                    return
            while True:
                await self._wake.wait()
                # One more loop iteration: the callers woken by the same event (a result
                # batch, a WAL group commit) join this batch instead of the next one.
                await asyncio.sleep(0)
                self._wake.clear()
                batches = self._full
                if self._batch.calls:
                    batches.append(self._batch)
                    self._batch = pb.BranchBatch()
                    self._batch_bytes = 0
                self._full = []
                unsent = self._unsent
                for batch in batches:
                    for entry in batch.calls:
                        unsent.discard(entry.id)
                for batch in batches:
                    if not batch.calls:
                        continue  # its calls expired before it was written
                    await call.write(batch)
                    self.batches_sent += 1
                    self.calls_sent += len(batch.calls)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # The RPC ended: the reader learns its status (UNIMPLEMENTED or a failure)
            # and ends the stream; give it a moment, then end it here.
            await asyncio.wait([self._reader], timeout=1.0)
            self._break(f"write failed: {e!r}")

    async def _read(self) -> None:
        call = self._call
        pending = self._pending
        try:
            while True:
                msg = await call.read()
                if msg is aio.EOF:
                    self._break("the participant ended the stream")
                    return
                for r in msg.results:
                    fut = pending.pop(r.id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(r)
        except asyncio.CancelledError:
            if self.broken is None:  # the RPC was cancelled under us
                self._break("stream cancelled")
            raise
        except aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._unsupported()
            else:
                self._break(f"{e.code().name}: {e.details()}")
        except Exception as e:
            self._break(repr(e))

    def _unsupported(self) -> None:
        self.unsupported = True
        self.broken = "the participant has no Stream (UNIMPLEMENTED)"
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(StreamUnsupported(self.address))
        self._stop_tasks()
        if self._on_unsupported is not None:
            self._on_unsupported(self)

    def _break(self, why: str) -> None:
        """Ends the stream for good: every pending call fails as UNAVAILABLE."""
        if self.broken is not None:
            return
        self.broken = f"stream to {self.address} broken: {why}"
        pending, self._pending = self._pending, {}
        if pending:
            log.info(
                "event=stream_broken address=%s pending=%d why=%s", self.address, len(pending), why
            )
        failure = self._failure(grpc.StatusCode.UNAVAILABLE, self.broken)
        unsent, self._unsent = self._unsent, set()
        for call_id, fut in pending.items():
            if fut.done():
                continue
            if call_id in unsent:
                fut.set_exception(CallNotSent(grpc.StatusCode.UNAVAILABLE, self.broken))
            else:
                fut.set_result(failure)
        self._stop_tasks()

    def _stop_tasks(self) -> None:
        self._call.cancel()
        current = asyncio.current_task()
        for task in (self._reader, self._writer):
            if task is not current:
                task.cancel()

    async def close(self) -> None:
        """Ends the stream (pending calls fail as UNAVAILABLE) and waits for its tasks."""
        log.info(
            "event=stream_closed address=%s batches=%d calls=%d",
            self.address,
            self.batches_sent,
            self.calls_sent,
        )
        self._break("the coordinator is closing it")
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)
