"""The client's session bookkeeping (``accord.client._session``) against a fake stream:
call ids, answers out of order, deadlines, a broken stream, fallbacks to unary, and the
automatic choice between the stream and unary calls."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc import aio

import accord.v1 as pb
from accord.client._session import MAX_SESSION_REQUEST_BYTES, SessionStub


class FakeCall:
    """A ``Session`` stream: what the client wrote, and answers the test feeds it."""

    def __init__(self) -> None:
        #: Every call written, in order (from however many messages).
        self.written: list[pb.SessionCall] = []
        self.messages = 0
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = False
        self.write_error: BaseException | None = None
        #: When set, a write waits for it (a stream whose flow control is closed).
        self.gate: asyncio.Event | None = None

    async def write(self, msg: pb.SessionRequest) -> None:
        if self.write_error is not None:
            raise self.write_error
        if self.gate is not None:
            await self.gate.wait()
        self.messages += 1
        self.written.extend(msg.calls)

    async def read(self) -> Any:
        item = await self.inbox.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True

    def answer(self, call_id: int, gid: str) -> None:
        txn = pb.Transaction(gid=gid, state=pb.TXN_STATE_COMMITTED)
        result = pb.SessionResult(call_id=call_id, response=pb.TransactionResponse(transaction=txn))
        self.inbox.put_nowait(pb.SessionResponse(results=[result]))

    def fail(self, call_id: int, code: grpc.StatusCode, message: str) -> None:
        result = pb.SessionResult(
            call_id=call_id, error=pb.CallStatus(code=code.value[0], message=message)
        )
        self.inbox.put_nowait(pb.SessionResponse(results=[result]))


class FakeRaw:
    def __init__(self) -> None:
        self.calls: list[FakeCall] = []
        self.metadata: list[Any] = []

    def Session(self, metadata: Any = None) -> FakeCall:
        call = FakeCall()
        self.calls.append(call)
        self.metadata.append(metadata)
        return call


class FakeUnary:
    """The unary stub: answers at once (or after ``hold`` is set)."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.hold: asyncio.Event | None = None

    async def Execute(self, request: pb.ExecuteRequest, **kw: Any) -> pb.TransactionResponse:
        self.requests.append(request)
        if self.hold is not None:
            await self.hold.wait()
        txn = pb.Transaction(gid=f"unary-{request.idempotency_key}")
        return pb.TransactionResponse(transaction=txn)

    Commit = Abort = StartSaga = Execute


def stub(mode: str = "session", threshold: int = 8) -> tuple[SessionStub, FakeRaw, FakeUnary]:
    raw, unary = FakeRaw(), FakeUnary()
    s = SessionStub(
        unary, raw, mode=mode, threshold=threshold, metadata=(("authorization", "Bearer t"),)
    )
    return s, raw, unary


def req(key: str, size: int = 0) -> pb.ExecuteRequest:
    branch = pb.Branch(service="bank", operation="debit", payload=b"x" * size)
    return pb.ExecuteRequest(idempotency_key=key, branches=[branch])


async def written(call: FakeCall, n: int) -> list[pb.SessionCall]:
    for _ in range(200):
        if len(call.written) >= n:
            return call.written
        await asyncio.sleep(0.005)
    raise AssertionError(f"{len(call.written)} calls written, not {n}")


async def test_ids_and_answers_out_of_order() -> None:
    s, raw, _ = stub()
    tasks = [asyncio.create_task(s.Execute(req(f"k{i}"), timeout=5)) for i in range(3)]
    sent = await written_first(raw, 3)
    (call,) = raw.calls  # one stream, opened by the first call
    ids = [m.call_id for m in sent]
    assert len(set(ids)) == 3 and ids == sorted(ids)
    assert [m.execute.idempotency_key for m in sent] == ["k0", "k1", "k2"]
    assert raw.metadata == [(("authorization", "Bearer t"),)]
    assert call.messages == 1  # made in one tick: one message
    for m in reversed(sent):  # answered last to first
        call.answer(m.call_id, f"gid-{m.execute.idempotency_key}")
    results = await asyncio.gather(*tasks)
    assert [r.transaction.gid for r in results] == ["gid-k0", "gid-k1", "gid-k2"]
    assert s.session is not None and not s.session.pending
    # An answer for an id nobody waits for is dropped.
    call.answer(999, "stray")
    t = asyncio.create_task(s.Commit(pb.CommitRequest(gid="g"), timeout=5))
    (m,) = (await written(call, 4))[3:]
    assert m.WhichOneof("call") == "commit" and m.call_id not in ids
    call.answer(m.call_id, "g")
    assert (await t).transaction.gid == "g"
    await s.close()


async def test_an_error_answer_is_the_unary_error() -> None:
    s, raw, _ = stub()
    t = asyncio.create_task(s.Abort(pb.AbortRequest(gid="g"), timeout=5))
    (m,) = await written_first(raw)
    raw.calls[0].fail(m.call_id, grpc.StatusCode.NOT_FOUND, "unknown transaction 'g'")
    with pytest.raises(aio.AioRpcError) as e:
        await t
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details() == "unknown transaction 'g'"
    await s.close()


async def written_first(raw: FakeRaw, n: int = 1) -> list[pb.SessionCall]:
    for _ in range(200):
        if raw.calls:
            return await written(raw.calls[0], n)
        await asyncio.sleep(0.005)
    raise AssertionError("no session opened")


async def test_deadline_then_late_answer_dropped() -> None:
    s, raw, _ = stub()
    with pytest.raises(aio.AioRpcError) as e:
        await s.Execute(req("slow"), timeout=0.05)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert s.session is not None and not s.session.pending
    (m,) = raw.calls[0].written
    raw.calls[0].answer(m.call_id, "late")
    await asyncio.sleep(0.01)
    assert s.session.broken is None  # the session goes on
    await s.close()


async def test_a_broken_stream_fails_pending_calls_unavailable_then_reopens() -> None:
    s, raw, unary = stub()
    tasks = [asyncio.create_task(s.Execute(req(f"k{i}"), timeout=5)) for i in range(2)]
    await written_first(raw, 2)
    raw.calls[0].inbox.put_nowait(aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "eof"))
    for t in tasks:
        with pytest.raises(aio.AioRpcError) as e:
            await t
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "session broken" in (e.value.details() or "")
    assert raw.calls[0].cancelled and not unary.requests  # sent: never re-sent here
    t = asyncio.create_task(s.Execute(req("after"), timeout=5))
    for _ in range(200):
        if len(raw.calls) == 2 and raw.calls[1].written:
            break
        await asyncio.sleep(0.005)
    m = raw.calls[1].written[0]
    raw.calls[1].answer(m.call_id, "again")
    assert (await t).transaction.gid == "again"
    await s.close()


async def test_calls_never_written_go_unary() -> None:
    s, raw, unary = stub()
    first = asyncio.create_task(s.Execute(req("k0"), timeout=5))
    await written_first(raw)
    raw.calls[0].gate = asyncio.Event()  # the next write hangs
    second = asyncio.create_task(s.Execute(req("k1"), timeout=5))
    await asyncio.sleep(0.01)
    third = asyncio.create_task(s.Execute(req("k2"), timeout=5))  # queued behind it
    await asyncio.sleep(0.01)
    raw.calls[0].inbox.put_nowait(aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "x"))
    for t in (first, second):  # written, or being written: their fate is unknown
        with pytest.raises(aio.AioRpcError):
            await t
    assert (await third).transaction.gid == "unary-k2"  # never written: sent unary
    assert [r.idempotency_key for r in unary.requests] == ["k2"]
    await s.close()


async def test_unimplemented_falls_back_to_unary_for_good() -> None:
    s, raw, _unary = stub()
    t = asyncio.create_task(s.Execute(req("k0"), timeout=5))
    await written_first(raw)
    raw.calls[0].inbox.put_nowait(
        aio.AioRpcError(grpc.StatusCode.UNIMPLEMENTED, None, None, "no Session")
    )
    assert (await t).transaction.gid == "unary-k0"
    assert (await s.Execute(req("k1"), timeout=5)).transaction.gid == "unary-k1"
    assert len(raw.calls) == 1
    await s.close()


async def test_unauthenticated_stream() -> None:
    s, raw, unary = stub()
    t = asyncio.create_task(s.Execute(req("k0"), timeout=5))
    await written_first(raw)
    raw.calls[0].inbox.put_nowait(
        aio.AioRpcError(grpc.StatusCode.UNAUTHENTICATED, None, None, "unknown token")
    )
    with pytest.raises(aio.AioRpcError) as e:
        await t
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert e.value.details() == "unknown token"
    assert not unary.requests
    await s.close()


async def test_the_session_limit_refusal_goes_unary() -> None:
    s, raw, _unary = stub()
    t = asyncio.create_task(s.Execute(req("k0"), timeout=5))
    (m,) = await written_first(raw)
    raw.calls[0].fail(
        m.call_id, grpc.StatusCode.RESOURCE_EXHAUSTED, "session limit: 4 calls in flight"
    )
    assert (await t).transaction.gid == "unary-k0"
    # Any other RESOURCE_EXHAUSTED is the call's own answer.
    t = asyncio.create_task(s.Execute(req("k1"), timeout=5))
    (m,) = (await written(raw.calls[0], 2))[1:]
    raw.calls[0].fail(m.call_id, grpc.StatusCode.RESOURCE_EXHAUSTED, "limit 3 per caller")
    with pytest.raises(aio.AioRpcError) as e:
        await t
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await s.close()


async def test_auto_uses_the_stream_from_the_threshold_on() -> None:
    s, raw, unary = stub(mode="auto", threshold=3)
    unary.hold = asyncio.Event()
    a = asyncio.create_task(s.Execute(req("a"), timeout=5))
    b = asyncio.create_task(s.Execute(req("b"), timeout=5))
    await asyncio.sleep(0.01)
    assert [r.idempotency_key for r in unary.requests] == ["a", "b"] and not raw.calls
    c = asyncio.create_task(s.Execute(req("c"), timeout=5))  # the third in flight
    (m,) = await written_first(raw)
    assert m.execute.idempotency_key == "c"
    raw.calls[0].answer(m.call_id, "streamed-c")
    assert (await c).transaction.gid == "streamed-c"
    unary.hold.set()
    await asyncio.gather(a, b)
    assert s.inflight == 0
    # One at a time: unary again.
    assert (await s.Execute(req("d"), timeout=5)).transaction.gid == "unary-d"
    await s.close()


async def test_unary_mode_and_large_requests() -> None:
    s, raw, _ = stub(mode="unary")
    assert (await s.Execute(req("k"), timeout=5)).transaction.gid == "unary-k"
    assert not raw.calls
    s, raw, _unary = stub(mode="session")
    big = req("big", size=MAX_SESSION_REQUEST_BYTES)
    assert (await s.Execute(big, timeout=5)).transaction.gid == "unary-big"
    assert not raw.calls
    with pytest.raises(ValueError):
        stub(mode="sometimes")
