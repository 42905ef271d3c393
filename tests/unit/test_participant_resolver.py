"""The in-doubt resolver against an in-process fake coordinator (QueryOutcome only)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

import accord.v1 as pb
from accord.common.transport import bind, make_server
from accord.participants import (
    BranchCall,
    InDoubtResolver,
    Op,
    ParticipantServer,
    ParticipantService,
    Store,
)
from accord.participants.bank import bank_app, seed_accounts


class FakeCoordinator:
    """Implements only Coordinator.QueryOutcome; an unknown gid answers UNAVAILABLE."""

    def __init__(self, outcomes: dict[str, pb.Outcome.ValueType]) -> None:
        self.outcomes = outcomes
        self.queries: list[str] = []

    async def query_outcome(
        self, request: pb.QueryOutcomeRequest, context: Any
    ) -> pb.QueryOutcomeResponse:
        self.queries.append(request.gid)
        if request.gid not in self.outcomes:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "recovering")
        return pb.QueryOutcomeResponse(outcome=self.outcomes[request.gid])

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.unary_unary_rpc_method_handler(
            self.query_outcome,
            request_deserializer=pb.QueryOutcomeRequest.FromString,
            response_serializer=pb.QueryOutcomeResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(
            "accord.v1.Coordinator", {"QueryOutcome": method}
        )


@pytest.fixture
async def coordinator() -> AsyncIterator[tuple[FakeCoordinator, str]]:
    fake = FakeCoordinator(
        {
            "gc": pb.OUTCOME_COMMITTED,
            "ga": pb.OUTCOME_ABORTED,
            "gp": pb.OUTCOME_IN_PROGRESS,
        }
    )
    server, settings = make_server()
    server.add_generic_rpc_handlers((fake.handler(),))
    port = bind(server, "127.0.0.1:0", settings)
    await server.start()
    yield fake, f"127.0.0.1:{port}"
    await server.stop(None)


def debit(gid: str, address: str, amount: int = 10, epoch: int = 3) -> BranchCall:
    payload = json.dumps({"account": "bank-0", "amount": amount}).encode()
    return BranchCall(
        gid=gid,
        branch_id="b1",
        operation="debit",
        payload=payload,
        coordinator_address=address,
        shard="s1",
        epoch=epoch,
    )


async def balance(svc: ParticipantService) -> tuple[int, int]:
    row = await svc.store.read(
        lambda c: c.execute("SELECT balance, held FROM accounts WHERE id = 'bank-0'").fetchone()
    )
    return int(row[0]), int(row[1])


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_run_once_resolves_by_outcome(
    tmp_path: Path, coordinator: tuple[FakeCoordinator, str]
) -> None:
    fake, address = coordinator
    svc = ParticipantService(bank_app(seed=seed_accounts("bank", 1, 100)), Store(tmp_path / "b.db"))
    await svc.open()
    resolver = InDoubtResolver(svc, after_s=0.0, interval_s=0.05)
    try:
        for gid in ("gc", "ga", "gp", "gu"):
            assert (await svc.call(Op.PREPARE, debit(gid, address))).ok
        # A newer coordinator epoch was seen since: the resolver's outcome is not fenced.
        assert (await svc.call(Op.PREPARE, debit("gx", address, 1), fence=True)).ok
        await svc.call(
            Op.ABORT, BranchCall(gid="gx", branch_id="b1", operation="", shard="s1", epoch=9)
        )
        assert await balance(svc) == (100, 40)

        assert await resolver.run_once() == 2
        assert await balance(svc) == (90, 20)  # gc committed, ga released
        assert sorted(b.gid for b in await svc.in_doubt(0.0)) == ["gp", "gu"]
        assert sorted(fake.queries) == ["ga", "gc", "gp", "gu"]

        # In progress / unavailable: asked again only after a backoff.
        assert await resolver.run_once() == 0
        assert sorted(fake.queries) == ["ga", "gc", "gp", "gu"]
        await asyncio.sleep(0.06)
        fake.outcomes["gu"] = pb.OUTCOME_ABORTED
        assert await resolver.run_once() == 1
        assert [b.gid for b in await svc.in_doubt(0.0)] == ["gp"]
        assert await balance(svc) == (90, 10)
        # A duplicate Commit from the coordinator afterwards changes nothing.
        again = await svc.call(Op.COMMIT, debit("gc", address, epoch=9))
        assert again.ok and await balance(svc) == (90, 10)
    finally:
        await resolver.close()
        await svc.close()


async def test_young_and_unreachable_branches_stay_prepared(tmp_path: Path) -> None:
    svc = ParticipantService(bank_app(seed=seed_accounts("bank", 1, 100)), Store(tmp_path / "b.db"))
    await svc.open()
    young = InDoubtResolver(svc, after_s=60.0)
    unreachable = InDoubtResolver(svc, after_s=0.0, query_timeout_s=0.5)
    try:
        await svc.call(Op.PREPARE, debit("g1", "127.0.0.1:1"))
        await svc.call(Op.PREPARE, debit("g2", ""))
        assert await young.run_once() == 0
        assert await unreachable.run_once() == 0
        assert len(await svc.in_doubt(0.0)) == 2
    finally:
        await young.close()
        await unreachable.close()
        await svc.close()


async def test_background_resolution_in_a_server(
    tmp_path: Path, coordinator: tuple[FakeCoordinator, str]
) -> None:
    _, address = coordinator
    app = bank_app(seed=seed_accounts("bank", 1, 100))
    async with ParticipantServer(
        app, db=tmp_path / "b.db", in_doubt_after_s=0.2, resolver_interval_s=0.05
    ) as srv:
        await srv.service.call(Op.PREPARE, debit("gc", address))
        await srv.service.call(Op.PREPARE, debit("ga", address))

        async def settled() -> bool:
            return await balance(srv.service) == (90, 0)

        await eventually(settled)
        counts = await srv.service.branch_counts()
        assert counts["COMMITTED"] == 1 and counts["ABORTED"] == 1 and counts["PREPARED"] == 0
