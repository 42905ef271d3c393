"""The participant's ``Stream`` RPC over a real in-process grpc.aio server: every call
answered by id with the unary status, malformed calls answered without killing the
stream, the in-flight bound, results coalesced, and a clean end on server shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

import accord.v1 as pb
from accord.common.transport import make_channel
from accord.participants import ParticipantServer
from tests.unit.test_participant_server import inventory, req, seen, stock

OK = grpc.StatusCode.OK.value[0]
ABORTED = grpc.StatusCode.ABORTED.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


class StreamClient:
    """One open ``Stream``: send batches, collect results by id."""

    def __init__(self, stub: pb.ParticipantStub) -> None:
        self.call = stub.Stream()
        self.results: dict[int, pb.BatchedResult] = {}
        self.batches: list[int] = []

    async def send(self, *calls: tuple[int, int, pb.BranchRequest]) -> None:
        batch = pb.BranchBatch()
        for call_id, method, request in calls:
            batch.calls.add(id=call_id, method=method, request=request)
        await self.call.write(batch)

    async def collect(self, ids: set[int], timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not ids <= self.results.keys():
                msg = await self.call.read()
                assert msg is not grpc.aio.EOF, "stream ended early"
                self.batches.append(len(msg.results))
                for r in msg.results:
                    self.results[r.id] = r


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[ParticipantServer, pb.ParticipantStub]]:
    seen.clear()
    async with ParticipantServer(inventory, db=tmp_path / "inv.db", stream_max_inflight=4) as srv:
        channel = make_channel(srv.address)
        yield srv, pb.ParticipantStub(channel)
        await channel.close()


async def test_calls_answered_by_id_with_the_unary_contract(
    served: tuple[ParticipantServer, pb.ParticipantStub],
) -> None:
    srv, stub = served
    s = StreamClient(stub)
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await s.send(
        (1, pb.BRANCH_METHOD_PREPARE, req("g1")),
        (2, pb.BRANCH_METHOD_PREPARE, req("g2", "peek", trace_context={"traceparent": tp})),
    )
    await s.collect({1, 2})
    assert s.results[1].code == OK and s.results[1].response.message == "prepared"
    assert s.results[2].code == OK and s.results[2].response.read_only
    assert seen[-1].traceparent == tp
    await s.send(
        (3, pb.BRANCH_METHOD_COMMIT, req("g1")),
        (4, pb.BRANCH_METHOD_PREPARE, req("g3")),  # one apple left: yes
        (5, pb.BRANCH_METHOD_PREPARE, req("g5", "wait")),
    )
    await s.collect({3, 4, 5})
    assert [s.results[i].code for i in (3, 4, 5)] == [OK, OK, FAILED_PRECONDITION]
    assert s.results[5].message == "come back later"
    await s.send((6, pb.BRANCH_METHOD_PREPARE, req("g6")))
    await s.collect({6})
    assert (s.results[6].code, s.results[6].message) == (ABORTED, "out of stock: apple")
    assert await stock(srv) == (0, 1)
    # Fencing, as over unary: a lower epoch than seen for the shard is refused.
    await s.send((7, pb.BRANCH_METHOD_PREPARE, req("g7", "peek", shard="s", epoch=9)))
    await s.collect({7})
    await s.send((8, pb.BRANCH_METHOD_PREPARE, req("g8", "peek", shard="s", epoch=8)))
    await s.collect({8})
    assert (s.results[8].code, s.results[8].message) == (
        FAILED_PRECONDITION,
        "fenced: epoch 8 < 9 for shard 's'",
    )
    s.call.cancel()


async def test_malformed_calls_get_invalid_argument_and_the_stream_goes_on(
    served: tuple[ParticipantServer, pb.ParticipantStub],
) -> None:
    _, stub = served
    s = StreamClient(stub)
    await s.send(
        (1, 99, req("g1")),  # unknown method
        (2, pb.BRANCH_METHOD_UNSPECIFIED, req("g2")),
        (3, pb.BRANCH_METHOD_PREPARE, pb.BranchRequest(branch_id="b1", operation="reserve")),
        (4, pb.BRANCH_METHOD_PREPARE, req("g4", "peek")),
    )
    await s.collect({1, 2, 3, 4})
    assert [s.results[i].code for i in (1, 2, 3)] == [INVALID_ARGUMENT] * 3
    assert "unknown method 99" in s.results[1].message
    assert "gid" in s.results[3].message
    assert s.results[4].code == OK
    await s.send((5, pb.BRANCH_METHOD_PREPARE, req("g5", "peek")))
    await s.collect({5})
    assert s.results[5].code == OK
    s.call.cancel()


async def test_in_flight_bound_and_coalesced_results(
    served: tuple[ParticipantServer, pb.ParticipantStub],
) -> None:
    _, stub = served
    s = StreamClient(stub)
    # Six calls in one batch against a bound of 4: two are refused at once, the four
    # others complete in one group commit and come back in one result batch.
    await s.send(*[(i, pb.BRANCH_METHOD_PREPARE, req(f"g{i}", "peek")) for i in range(1, 7)])
    await s.collect(set(range(1, 7)))
    codes = sorted(r.code for r in s.results.values())
    assert codes == [OK] * 4 + [RESOURCE_EXHAUSTED] * 2
    assert "more than 4 calls in flight" in s.results[5].message
    assert s.batches[0] >= 2 and len(s.batches) <= 3, s.batches
    s.call.cancel()


async def test_server_shutdown_ends_the_stream_after_answering(tmp_path: Path) -> None:
    srv = ParticipantServer(inventory, db=tmp_path / "inv.db", grace_s=30)
    await srv.start()
    channel = make_channel(srv.address)
    s = StreamClient(pb.ParticipantStub(channel))
    await s.send((1, pb.BRANCH_METHOD_PREPARE, req("g1", "peek")))
    await s.collect({1})
    t0 = asyncio.get_running_loop().time()
    await srv.stop()
    # Not the 30 s grace: the stream ended as soon as nothing was in flight.
    assert asyncio.get_running_loop().time() - t0 < 5
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while await s.call.read() is not grpc.aio.EOF:
            pass
        await s.call  # the status
        raise AssertionError("stream ended with OK")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    await channel.close()
