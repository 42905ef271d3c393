"""The coordinator's stream multiplexer (``ParticipantCalls`` with the stream transport)
against in-process grpc.aio participants whose ``Stream`` the test controls: calls of
one loop tick share one batch, a deadline gives DEADLINE_EXCEEDED, a broken stream fails
what is pending as UNAVAILABLE and the next call reopens, UNIMPLEMENTED falls back to
unary (auto) or is retried (stream), a fenced answer reaches ``on_fenced``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

import accord.v1 as pb
from accord.common.transport import TransportSettings, bind, make_server
from accord.coordinator._calls import ParticipantCalls, Transport, Verdict
from accord.coordinator._methods import Method
from accord.registry import StaticRegistry


class Controlled(pb.ParticipantServicer):
    """Answers every stream call with the status the test chose for its gid (OK by
    default); gids in ``hold`` are never answered. Unary calls answer OK."""

    def __init__(self, *, stream: bool = True) -> None:
        self.stream = stream
        self.codes: dict[str, tuple[grpc.StatusCode, str]] = {}
        self.hold: set[str] = set()
        self.batches: list[list[pb.BatchedCall]] = []
        self.unary: list[str] = []
        self.opened = 0

    async def Prepare(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        self.unary.append(request.gid)
        return pb.BranchResponse(message="unary")

    Commit = Abort = Execute = Compensate = Prepare

    async def Stream(
        self, request_iterator: AsyncIterator[pb.BranchBatch], context: Any
    ) -> AsyncIterator[pb.BranchResultBatch]:
        if not self.stream:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no stream here")
        self.opened += 1
        async for batch in request_iterator:
            self.batches.append(list(batch.calls))
            out = pb.BranchResultBatch()
            for c in batch.calls:
                if c.request.gid in self.hold:
                    continue
                code, message = self.codes.get(c.request.gid, (grpc.StatusCode.OK, ""))
                out.results.add(
                    id=c.id,
                    code=code.value[0],
                    message=message,
                    response=pb.BranchResponse(message=f"stream {c.request.gid}"),
                )
            if out.results:
                yield out


class Served:
    def __init__(self, servicer: Controlled) -> None:
        self.servicer = servicer
        self.server: aio.Server | None = None
        self.address = ""

    async def start(self, port: int = 0) -> Served:
        settings = TransportSettings()
        server, _ = make_server(settings)
        pb.add_ParticipantServicer_to_server(self.servicer, server)
        bound = bind(server, f"127.0.0.1:{port}", settings)
        self.address = f"127.0.0.1:{bound}"
        await server.start()
        self.server = server
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)


@pytest.fixture
async def participant() -> AsyncIterator[Served]:
    served = await Served(Controlled()).start()
    yield served
    await served.stop()


def req(gid: str, **kw: Any) -> pb.BranchRequest:
    return pb.BranchRequest(gid=gid, branch_id="b1", operation="op", **kw)


def calls_for(mode: Transport = Transport.STREAM, **kw: Any) -> ParticipantCalls:
    return ParticipantCalls(
        registry=StaticRegistry(), transport=TransportSettings(), mode=mode, **kw
    )


async def test_calls_of_one_tick_share_a_batch_and_results_match_ids(
    participant: Served,
) -> None:
    calls = calls_for()
    participant.servicer.codes = {
        "no": (grpc.StatusCode.ABORTED, "refused"),
        "later": (grpc.StatusCode.FAILED_PRECONDITION, "not yet"),
    }
    tp = (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),)
    try:
        gids = [f"g{i}" for i in range(20)] + ["no", "later"]
        requests = {g: req(g) for g in gids}
        results = await asyncio.gather(
            *(
                calls.call(Method.PREPARE, participant.address, requests[g], 5, metadata=tp)
                for g in gids
            )
        )
        assert [r.verdict for r in results[:20]] == [Verdict.OK] * 20
        assert [r.detail for r in results[:20]] == [f"stream {g}" for g in gids[:20]]
        assert (results[20].verdict, results[20].detail) == (Verdict.NO, "refused")
        assert results[21].verdict is Verdict.RETRY
        assert results[21].code == grpc.StatusCode.FAILED_PRECONDITION
        # One batch for the 22 calls made in one tick, each with the trace context,
        # while the caller's requests are left untouched.
        assert [len(b) for b in participant.servicer.batches] == [22]
        sent = participant.servicer.batches[0]
        assert {c.method for c in sent} == {pb.BRANCH_METHOD_PREPARE}
        assert all(dict(c.request.trace_context) == dict(tp) for c in sent)
        assert not any(r.trace_context for r in requests.values())
        assert participant.servicer.unary == []
        assert calls.streams_opened == 1
    finally:
        await calls.close()


async def test_deadline_gives_deadline_exceeded_and_the_stream_goes_on(
    participant: Served,
) -> None:
    calls = calls_for()
    participant.servicer.hold = {"slow"}
    try:
        t0 = asyncio.get_running_loop().time()
        slow = await calls.call(Method.PREPARE, participant.address, req("slow"), 0.2)
        assert slow.verdict is Verdict.RETRY and slow.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.15 < asyncio.get_running_loop().time() - t0 < 2
        fine = await calls.call(Method.PREPARE, participant.address, req("fine"), 5)
        assert fine.verdict is Verdict.OK
        assert calls.streams_opened == 1
    finally:
        await calls.close()


async def test_broken_stream_fails_pending_as_unavailable_and_reopens() -> None:
    first = await Served(Controlled()).start()
    port = int(first.address.rsplit(":", 1)[1])
    first.servicer.hold = {"stuck"}
    calls = calls_for()
    try:
        assert (await calls.call(Method.PREPARE, first.address, req("a"), 5)).verdict is Verdict.OK
        pending = asyncio.ensure_future(calls.call(Method.PREPARE, first.address, req("stuck"), 30))
        await asyncio.sleep(0.1)
        await first.stop()  # the participant goes away with a call in flight
        broken = await asyncio.wait_for(pending, 5)
        assert broken.verdict is Verdict.RETRY and broken.code == grpc.StatusCode.UNAVAILABLE
        # Back on the same address: the next call opens a new stream.
        second = await Served(Controlled()).start(port)
        try:
            result = None
            for _ in range(50):
                result = await calls.call(Method.PREPARE, first.address, req("b"), 5)
                if result.verdict is Verdict.OK:
                    break
                assert result.code == grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(0.05)
            assert result is not None and result.verdict is Verdict.OK, result
            assert second.servicer.opened == 1
            assert calls.streams_opened >= 2
        finally:
            await second.stop()
    finally:
        await calls.close()


async def test_unimplemented_falls_back_to_unary_in_auto_mode() -> None:
    bare = await Served(Controlled(stream=False)).start()
    fallbacks: list[str] = []
    calls = calls_for(Transport.AUTO, on_fallback=fallbacks.append)
    try:
        results = await asyncio.gather(
            *(calls.call(Method.PREPARE, bare.address, req(f"g{i}"), 5) for i in range(3))
        )
        assert [r.detail for r in results] == ["unary"] * 3
        assert (await calls.call(Method.PREPARE, bare.address, req("g4"), 5)).detail == "unary"
        assert sorted(bare.servicer.unary) == ["g0", "g1", "g2", "g4"]
        assert fallbacks == [bare.address] and calls.fallbacks == 1
        assert calls.streams_opened == 1  # not asked again for a while
    finally:
        await calls.close()
        await bare.stop()


async def test_unimplemented_is_retried_when_the_stream_is_required() -> None:
    bare = await Served(Controlled(stream=False)).start()
    calls = calls_for(Transport.STREAM)
    try:
        result = await calls.call(Method.PREPARE, bare.address, req("g"), 5)
        assert result.verdict is Verdict.RETRY and result.code == grpc.StatusCode.UNIMPLEMENTED
        assert bare.servicer.unary == [] and calls.fallbacks == 0
    finally:
        await calls.close()
        await bare.stop()


async def test_unary_mode_never_opens_a_stream(participant: Served) -> None:
    calls = calls_for(Transport.UNARY)
    try:
        assert (
            await calls.call(Method.PREPARE, participant.address, req("g"), 5)
        ).detail == "unary"
        assert participant.servicer.opened == 0 and calls.streams_opened == 0
    finally:
        await calls.close()


async def test_fenced_answer_over_the_stream_reaches_on_fenced(participant: Served) -> None:
    fenced: list[str] = []
    calls = calls_for(on_fenced=fenced.append)
    participant.servicer.codes = {
        "old": (grpc.StatusCode.FAILED_PRECONDITION, "fenced: epoch 1 < 2 for shard 's'")
    }
    try:
        result = await calls.call(Method.PREPARE, participant.address, req("old"), 5)
        assert result.verdict is Verdict.RETRY
        assert len(fenced) == 1 and "fenced: epoch 1 < 2" in fenced[0]
    finally:
        await calls.close()


async def test_close_fails_pending_calls(participant: Served) -> None:
    calls = calls_for()
    participant.servicer.hold = {"stuck"}
    pending = asyncio.ensure_future(
        calls.call(Method.PREPARE, participant.address, req("stuck"), 30)
    )
    await asyncio.sleep(0.1)
    await calls.close()
    result = await asyncio.wait_for(pending, 5)
    assert result.code == grpc.StatusCode.UNAVAILABLE


async def test_large_payloads_are_split_across_batches(participant: Served) -> None:
    calls = calls_for()
    big = b"x" * (400 * 1024)  # two fit in one batch (about 1 MiB), three do not
    try:
        results = await asyncio.gather(
            *(
                calls.call(Method.PREPARE, participant.address, req(f"g{i}", payload=big), 5)
                for i in range(3)
            )
        )
        assert [r.verdict for r in results] == [Verdict.OK] * 3
        assert sorted(len(b) for b in participant.servicer.batches) == [1, 2]
    finally:
        await calls.close()
