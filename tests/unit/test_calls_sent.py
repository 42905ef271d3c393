"""Whether a failed participant call can have reached the participant
(``CallResult.sent``), decided from structure (the channel was never connected, the
stream never took the call), for both transports, against real in-process grpc.aio
servers and a port nothing listens on."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

import accord.v1 as pb
from accord.common.transport import TransportSettings, make_channel
from accord.coordinator._calls import ParticipantCalls, Transport, Verdict, wait_connected
from accord.coordinator._methods import Method
from accord.coordinator._stream import CallNotSent, ParticipantStream
from accord.registry import StaticRegistry
from accord.tools.topology import free_port
from tests.unit.test_participant_calls_stream import Controlled, Served, req

TRANSPORTS = [Transport.UNARY, Transport.STREAM]


class Holding(Controlled):
    """As :class:`Controlled`; unary calls for gids in ``hold`` are never answered."""

    async def Prepare(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        if request.gid in self.hold:
            await asyncio.sleep(3600)
        return await super().Prepare(request, context)

    Commit = Abort = Execute = Compensate = Prepare


def calls_for(mode: Transport, services: dict[str, str] | None = None) -> ParticipantCalls:
    return ParticipantCalls(
        registry=StaticRegistry(services or {}), transport=TransportSettings(), mode=mode
    )


async def test_wait_connected() -> None:
    served = await Served(Controlled()).start()
    live = make_channel(served.address)
    closed = make_channel(f"127.0.0.1:{free_port()}")
    try:
        assert await wait_connected(live, 5) is None
        why = await wait_connected(closed, 5)
        assert why is not None and "TRANSIENT_FAILURE" in why
        # Once there, answered at once (as gRPC fails a call there without sending it).
        assert await wait_connected(closed, 0.001) == why
    finally:
        await live.close()
        await closed.close()
        await served.stop()


@pytest.mark.parametrize("mode", TRANSPORTS)
async def test_nothing_listening_is_not_sent(mode: Transport) -> None:
    calls = calls_for(mode)
    address = f"127.0.0.1:{free_port()}"
    try:
        for _ in range(3):  # the first attempt and later ones (channel in failure)
            r = await calls.call(Method.EXECUTE, address, req("g"), 5)
            assert r.verdict is Verdict.RETRY and r.code == grpc.StatusCode.UNAVAILABLE, r
            assert not r.sent and "not sent" in r.detail, r
    finally:
        await calls.close()


async def test_no_live_instance_is_not_sent() -> None:
    calls = calls_for(Transport.UNARY)
    try:
        r, nxt = await calls.send(Method.EXECUTE, "car", "", "", req("g"), 5)
        assert not r.sent and r.code == grpc.StatusCode.UNAVAILABLE and nxt == ""
    finally:
        await calls.close()


@pytest.mark.parametrize("mode", TRANSPORTS)
async def test_answers_and_lost_answers_may_have_been_sent(mode: Transport) -> None:
    served = await Served(Holding()).start()
    served.servicer.hold = {"held"}
    served.servicer.codes = {"later": (grpc.StatusCode.FAILED_PRECONDITION, "not yet")}
    calls = calls_for(mode)
    try:
        ok = await calls.call(Method.EXECUTE, served.address, req("g"), 5)
        assert ok.verdict is Verdict.OK
        if mode is Transport.STREAM:
            later = await calls.call(Method.EXECUTE, served.address, req("later"), 5)
            assert later.code == grpc.StatusCode.FAILED_PRECONDITION and later.sent
        late = await calls.call(Method.EXECUTE, served.address, req("held"), 0.3)
        assert late.code == grpc.StatusCode.DEADLINE_EXCEEDED and late.sent, late
        # The participant goes away with a call in flight: UNAVAILABLE, maybe sent.
        pending = asyncio.ensure_future(calls.call(Method.EXECUTE, served.address, req("held"), 30))
        await asyncio.sleep(0.2)
        await served.stop()
        lost = await asyncio.wait_for(pending, 10)
        assert lost.code == grpc.StatusCode.UNAVAILABLE and lost.sent, lost
        # Nothing listens there any more: the next attempts are not sent.
        for _ in range(50):
            r = await calls.call(Method.EXECUTE, served.address, req("g2"), 2)
            if not r.sent:
                break
            await asyncio.sleep(0.05)
        assert not r.sent and r.code == grpc.StatusCode.UNAVAILABLE, r
    finally:
        await calls.close()
        await served.stop()


async def test_stream_not_open_yet_sends_nothing_and_drops_expired_calls() -> None:
    """A call whose deadline passes while the stream waits for its connection is taken
    out of its batch (it never goes out later); a connection that fails ends the stream
    with every pending call not sent."""
    served = await Served(Controlled()).start()
    channel = make_channel(served.address)
    gate: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

    async def connect() -> str | None:
        return await gate

    stream = ParticipantStream(pb.ParticipantStub(channel), served.address, connect=connect)
    try:
        with pytest.raises(CallNotSent) as info:
            await stream.call(pb.BRANCH_METHOD_EXECUTE, req("expired"), 0.1)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        kept = asyncio.ensure_future(stream.call(pb.BRANCH_METHOD_EXECUTE, req("kept"), 5))
        await asyncio.sleep(0.05)
        gate.set_result(None)  # connected: the queued batch goes out
        r = await asyncio.wait_for(kept, 5)
        assert r.code == grpc.StatusCode.OK.value[0]
        sent = [c.request.gid for batch in served.servicer.batches for c in batch]
        assert sent == ["kept"]
    finally:
        await stream.close()

    gate2: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

    async def connect2() -> str | None:
        return await gate2

    stream2 = ParticipantStream(pb.ParticipantStub(channel), served.address, connect=connect2)
    try:
        pending = asyncio.ensure_future(stream2.call(pb.BRANCH_METHOD_EXECUTE, req("never"), 5))
        await asyncio.sleep(0.05)
        gate2.set_result("cannot connect")
        with pytest.raises(CallNotSent) as info:
            await asyncio.wait_for(pending, 5)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert "cannot connect" in info.value.message
        with pytest.raises(CallNotSent):  # a broken stream takes no calls
            await stream2.call(pb.BRANCH_METHOD_EXECUTE, req("after"), 5)
        assert [c.request.gid for b in served.servicer.batches for c in b] == ["kept"]
    finally:
        await stream2.close()
        await channel.close()
        await served.stop()
