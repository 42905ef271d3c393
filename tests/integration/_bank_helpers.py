"""Helpers for the bank integration tests: bank participant processes started with
``python -m accord.participants.bank`` through a :class:`Topology` (port read from their
``listening on`` line, stopped by PID), a fake coordinator answering only
``QueryOutcome``, and request builders."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

import accord.bank.v1 as bankpb
import accord.v1 as pb
from accord.common.transport import bind, make_channel, make_server
from accord.tools.topology import ManagedProcess, ProcessFailed, Topology

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


@dataclass
class BankProcess:
    """One ``python -m accord.participants.bank`` process and a channel to it."""

    db: Path
    process: ManagedProcess
    channel: aio.Channel = field(init=False)
    participant: pb.ParticipantStub = field(init=False)
    admin: bankpb.BankStub = field(init=False)

    def __post_init__(self) -> None:
        self.channel = make_channel(self.address)
        self.participant = pb.ParticipantStub(self.channel)
        self.admin = bankpb.BankStub(self.channel)

    @property
    def address(self) -> str:
        return self.process.address

    @property
    def pid(self) -> int:
        return self.process.pid

    async def balances(self) -> dict[str, tuple[int, int]]:
        reply = await self.admin.GetBalances(bankpb.GetBalancesRequest(), timeout=5)
        return {a.id: (a.balance, a.held) for a in reply.accounts}

    async def summary(self) -> bankpb.GetBalancesResponse:
        reply: bankpb.GetBalancesResponse = await self.admin.GetBalances(
            bankpb.GetBalancesRequest(), timeout=5
        )
        return reply

    async def stop(self) -> int:
        """SIGTERM, wait, SIGKILL if it does not stop in time; returns the exit code."""
        await self.channel.close()
        code = await asyncio.to_thread(self.process.stop, STOP_TIMEOUT_S)
        assert code is not None
        return code

    async def crash(self) -> None:
        """SIGKILL: no cleanup, no flush, as a real crash."""
        await self.channel.close()
        await asyncio.to_thread(self.process.kill)


class BankProcesses:
    """Starts bank processes and stops every one of them at teardown (by PID)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.topology = Topology(workdir, start_timeout_s=START_TIMEOUT_S)
        self.started: list[BankProcess] = []

    async def start(
        self,
        db: Path,
        *,
        service: str = "bank",
        accounts: int = 0,
        initial_balance: int = 0,
        in_doubt_after_s: float = 10.0,
    ) -> BankProcess:
        proc = self.topology.bank(
            f"bank-{len(self.started)}",
            standalone=True,
            cwd=self.workdir,
            db=db,
            service=service,
            accounts=accounts,
            initial_balance=initial_balance,
            in_doubt_after_s=in_doubt_after_s,
            log_level="INFO",
            start=False,
        )
        return await self._spawn(db, proc)

    async def restart(self, old: BankProcess) -> BankProcess:
        """A new process on the same database and arguments (a new port)."""
        if old.process.alive():
            await old.stop()
        proc = self.topology.process(
            f"bank-{len(self.started)}", old.process.argv, cwd=self.workdir
        )
        return await self._spawn(old.db, proc)

    async def _spawn(self, db: Path, proc: ManagedProcess) -> BankProcess:
        try:
            await proc.start_async(START_TIMEOUT_S)
        except ProcessFailed as e:
            raise AssertionError(f"bank failed to start: {e}") from None
        bank = BankProcess(db=db, process=proc)
        self.started.append(bank)
        return bank

    async def stop_all(self) -> None:
        for bank in self.started:
            await bank.channel.close()
        await asyncio.to_thread(self.topology.stop)


def payload(account: str, amount: int | None = None) -> bytes:
    body: dict[str, Any] = {"account": account}
    if amount is not None:
        body["amount"] = amount
    return json.dumps(body).encode()


def branch(
    gid: str,
    branch_id: str,
    operation: str,
    account: str,
    amount: int | None = None,
    *,
    coordinator_address: str = "",
    shard: str = "",
    epoch: int = 0,
) -> pb.BranchRequest:
    return pb.BranchRequest(
        gid=gid,
        branch_id=branch_id,
        operation=operation,
        payload=payload(account, amount),
        coordinator_address=coordinator_address,
        shard=shard,
        epoch=epoch,
    )


async def status_of(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    """The gRPC status of a call (OK or the error's code and details)."""
    try:
        await call
    except aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


async def assert_eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 15.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within}s")
        await asyncio.sleep(0.05)


class FakeCoordinator:
    """A gRPC server implementing only ``Coordinator.QueryOutcome``, from a table of
    outcomes; a gid not in the table answers UNAVAILABLE."""

    def __init__(self, outcomes: dict[str, pb.Outcome.ValueType]) -> None:
        self.outcomes = outcomes
        self.queries: list[str] = []
        self.address = ""
        self._server: aio.Server | None = None

    async def start(self) -> FakeCoordinator:
        method = grpc.unary_unary_rpc_method_handler(
            self._query_outcome,
            request_deserializer=pb.QueryOutcomeRequest.FromString,
            response_serializer=pb.QueryOutcomeResponse.SerializeToString,
        )
        server, settings = make_server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "accord.v1.Coordinator", {"QueryOutcome": method}
                ),
            )
        )
        port = bind(server, "127.0.0.1:0", settings)
        await server.start()
        self._server, self.address = server, f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
            self._server = None

    async def _query_outcome(
        self, request: pb.QueryOutcomeRequest, context: Any
    ) -> pb.QueryOutcomeResponse:
        self.queries.append(request.gid)
        if request.gid not in self.outcomes:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "recovering")
        return pb.QueryOutcomeResponse(outcome=self.outcomes[request.gid])
