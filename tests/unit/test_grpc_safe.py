"""accord.common.grpc_safe on an in-process grpc.aio server: requests that do not decode
are INVALID_ARGUMENT in every kind of method, logged once per interval; good requests
pass through; an unimplemented method is UNIMPLEMENTED without a traceback."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

import accord.v1 as pb
from accord.common.grpc_safe import UndecodableLog, add_health, add_servicer, refusals_for

GARBAGE = b"\xff\xff\xff"


class _Coordinator(pb.CoordinatorServicer):
    async def GetTransaction(
        self, request: pb.GetTransactionRequest, context: Any
    ) -> pb.Transaction:
        return pb.Transaction(gid=request.gid)

    async def WatchTransaction(
        self, request: pb.WatchTransactionRequest, context: Any
    ) -> AsyncIterator[pb.TransactionEvent]:
        for _ in range(2):
            yield pb.TransactionEvent(gid=request.gid)


class _Participant(pb.ParticipantServicer):
    def __init__(self) -> None:
        self.seen: list[int] = []

    async def Stream(
        self, request_iterator: AsyncIterator[pb.BranchBatch], context: Any
    ) -> AsyncIterator[pb.BranchResultBatch]:
        async for batch in request_iterator:
            for c in batch.calls:
                self.seen.append(c.id)
                yield pb.BranchResultBatch(results=[pb.BatchedResult(id=c.id)])


async def _serve(logger: logging.Logger) -> tuple[aio.Server, int, _Participant]:
    server = aio.server()
    coordinator = _Coordinator()  # type: ignore[abstract]  # the others: UNIMPLEMENTED
    add_servicer(pb.add_CoordinatorServicer_to_server, coordinator, server, logger=logger)
    participant = _Participant()  # type: ignore[abstract]
    add_servicer(pb.add_ParticipantServicer_to_server, participant, server)
    add_health(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, participant


async def test_every_kind_of_method(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.grpc_safe")
    server, port, participant = await _serve(logger)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb.CoordinatorStub(ch)
            # Good requests pass through.
            assert (await stub.GetTransaction(pb.GetTransactionRequest(gid="g"))).gid == "g"
            events = [e async for e in stub.WatchTransaction(pb.WatchTransactionRequest(gid="w"))]
            assert [e.gid for e in events] == ["w", "w"]
            with caplog.at_level(logging.WARNING):
                for method in ("GetTransaction", "Begin"):  # implemented or not
                    with pytest.raises(aio.AioRpcError) as info:
                        await ch.unary_unary(f"/accord.v1.Coordinator/{method}")(GARBAGE)
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "does not decode" in (info.value.details() or "")
                call = ch.unary_stream("/accord.v1.Coordinator/WatchTransaction")(GARBAGE)
                with pytest.raises(aio.AioRpcError) as info:
                    async for _ in call:
                        pass
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                # A stream: the good batch before the bad one is answered, then it ends.
                good = pb.BranchBatch(calls=[pb.BatchedCall(id=7)]).SerializeToString()

                async def batches() -> AsyncIterator[bytes]:
                    yield good
                    yield GARBAGE
                    yield good

                stream = ch.stream_stream("/accord.v1.Participant/Stream")(batches())
                answers = []
                with pytest.raises(aio.AioRpcError) as info:
                    async for raw in stream:
                        answers.append(pb.BranchResultBatch.FromString(raw))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert participant.seen == [7]
                # Health (grpcio's own servicer) is covered too.
                with pytest.raises(aio.AioRpcError) as info:
                    await ch.unary_unary("/grpc.health.v1.Health/Check")(GARBAGE)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                # A method the servicer does not implement: UNIMPLEMENTED, no traceback.
                with pytest.raises(aio.AioRpcError) as info:
                    await stub.Begin(pb.BeginRequest())
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        lines = [r for r in caplog.records if "undecodable_request" in r.getMessage()]
        assert len(lines) == 1 and lines[0].name == "test.grpc_safe"
        assert not [r for r in caplog.records if r.exc_info]
        assert refusals_for(server).total == 5
    finally:
        await server.stop(0)


def test_rate_limited_log(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    refusals = UndecodableLog(logging.getLogger("test.rate"), interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        for _ in range(30):  # one a second for 30 s
            refusals.note("/s/M", "peer", "DecodeError: x")
            now[0] += 1.0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "suppressed=0" in lines[0] and "suppressed=9" in lines[1]
    assert refusals.total == 30
