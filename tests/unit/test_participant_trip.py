"""The trip-booking example (accord.participants.trip) on the SDK's saga API: book, a refused
city, cancel, duplicates, a cancel that overtakes its booking; and serving it."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

import accord.v1 as pb
from accord.common.transport import make_channel
from accord.participants import BranchCall, Op, ParticipantService, Status, Store
from accord.participants.trip import KINDS, serve_trip, trip_app
from accord.participants.trip._service import bookings


@pytest.fixture
async def hotel(tmp_path: Path) -> AsyncIterator[ParticipantService]:
    svc = ParticipantService(trip_app("hotel", fail_cities=["Atlantis"]), Store(tmp_path / "h.db"))
    await svc.open()
    yield svc
    await svc.close()


def trip(gid: str, operation: str, city: str = "Paris", *, trip_id: str = "") -> BranchCall:
    payload = json.dumps({"trip": trip_id or gid, "city": city, "nights": 2}).encode()
    return BranchCall(gid=gid, branch_id="hotel", operation=operation, payload=payload)


def test_kinds() -> None:
    assert KINDS == ("flight", "hotel", "car")
    assert trip_app("car").operations == ("book", "cancel")
    with pytest.raises(ValueError, match="kind must be one of"):
        trip_app("boat")


async def test_book_returns_a_confirmation(hotel: ParticipantService) -> None:
    r = await hotel.call(Op.EXECUTE, trip("saga-000001", "book"))
    assert r.ok
    assert json.loads(r.result) == {
        "kind": "hotel",
        "trip": "saga-000001",
        "confirmation": "HO-000001",
    }
    assert bookings(hotel.store.path) == {"saga-000001": "CONFIRMED"}


async def test_duplicate_book_books_once(hotel: ParticipantService) -> None:
    first = await hotel.call(Op.EXECUTE, trip("g1", "book"))
    # Without the barrier the duplicate would hit the bookings primary key.
    again = await hotel.call(Op.EXECUTE, trip("g1", "book"))
    assert first == again and again.ok
    assert bookings(hotel.store.path) == {"g1": "CONFIRMED"}


async def test_fail_city_is_refused(hotel: ParticipantService) -> None:
    r = await hotel.call(Op.EXECUTE, trip("g1", "book", "atlantis"))  # case-insensitive
    assert r.status is Status.REFUSED and r.message == "no hotel available in atlantis"
    assert bookings(hotel.store.path) == {}
    # Its compensation is a no-op.
    assert (await hotel.call(Op.COMPENSATE, trip("g1", "cancel", "atlantis"))).ok
    assert bookings(hotel.store.path) == {}


async def test_a_trip_id_booked_by_another_saga_is_refused(hotel: ParticipantService) -> None:
    assert (await hotel.call(Op.EXECUTE, trip("g1", "book", trip_id="t-42"))).ok
    r = await hotel.call(Op.EXECUTE, trip("g2", "book", "Rome", trip_id="t-42"))
    assert r.status is Status.REFUSED
    assert r.message == "trip t-42 already has a hotel booking: use a new trip id"
    # The second saga compensates its refused step: a no-op that leaves g1's booking.
    assert (await hotel.call(Op.COMPENSATE, trip("g2", "cancel", "Rome", trip_id="t-42"))).ok
    assert bookings(hotel.store.path) == {"t-42": "CONFIRMED"}


async def test_cancel(hotel: ParticipantService) -> None:
    await hotel.call(Op.EXECUTE, trip("g1", "book"))
    await hotel.call(Op.EXECUTE, trip("g2", "book", "Rome"))
    for _ in range(2):
        r = await hotel.call(Op.COMPENSATE, trip("g1", "cancel"))
        assert r.ok and r.message == "compensated"
    assert bookings(hotel.store.path) == {"g1": "CANCELLED", "g2": "CONFIRMED"}


async def test_cancel_before_book(hotel: ParticipantService) -> None:
    r = await hotel.call(Op.COMPENSATE, trip("g1", "cancel"))
    assert r.ok and r.message.startswith("no-op")
    # The late booking never lands: nothing is left booked for a cancelled trip.
    late = await hotel.call(Op.EXECUTE, trip("g1", "book"))
    assert late.status is Status.REFUSED and "already compensated" in late.message
    assert bookings(hotel.store.path) == {}


async def test_serve_trip_over_grpc(tmp_path: Path) -> None:
    out = io.StringIO()
    db = tmp_path / "flight.db"
    task = asyncio.create_task(
        serve_trip("flight", "127.0.0.1:0", db, fail_cities=["Nowhere"], out=out)
    )
    try:
        for _ in range(500):
            if "listening on" in out.getvalue() or task.done():
                break
            await asyncio.sleep(0.01)
        address = out.getvalue().split("listening on ", 1)[1].strip()
        channel = make_channel(address)
        stub = pb.ParticipantStub(channel)
        try:

            def req(gid: str, operation: str, city: str) -> pb.BranchRequest:
                body = json.dumps({"trip": gid, "city": city}).encode()
                return pb.BranchRequest(
                    gid=gid, branch_id="flight", operation=operation, payload=body
                )

            reply = await stub.Execute(req("g-abcdef", "book", "Oslo"))
            assert json.loads(reply.result)["confirmation"] == "FL-abcdef"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Execute(req("g2", "book", "Nowhere"))
            assert info.value.code() == grpc.StatusCode.ABORTED
            await stub.Compensate(req("g-abcdef", "cancel", "Oslo"))
        finally:
            await channel.close()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert bookings(db) == {"g-abcdef": "CANCELLED"}
