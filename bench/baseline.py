"""The bare grpc.aio baselines of a two-branch 2PC and of a saga: the same processes and
call patterns as Accord, and no logic at all (no WAL, no database, no state, no retries,
no compensation).

    python -m bench.baseline participant --listen 127.0.0.1:0
    python -m bench.baseline coordinator --listen 127.0.0.1:0 \\
        --service bank-a=HOST:PORT --service bank-b=HOST:PORT

The "coordinator" serves ``accord.v1.Coordinator/Execute``: per request it sends Prepare
to every branch's participant in parallel, then Commit to all of them in parallel (one
channel per participant, reused), and answers with a ``TransactionResponse`` shaped like
Accord's (gid, state, one status per branch). It also serves
``accord.v1.Coordinator/StartSaga``: per request it sends Execute for each step once the
steps it depends on have returned (a chain ``a <- b <- c`` runs strictly in sequence,
independent steps in parallel), never compensates, and answers a COMPLETED
``TransactionResponse`` with one status per step. The "participants" serve
``accord.v1.Participant`` Prepare/Commit/Abort/Execute/Compensate and answer an empty
``BranchResponse`` at once; their ``Stream`` answers UNIMPLEMENTED.
The real accord.v1 messages are used everywhere, so serialisation costs the same as in
Accord. Like Accord's processes, each runs on uvloop, is built through
:mod:`accord.common.transport`, prints ``listening on HOST:PORT`` once it serves and stops on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc import aio

import accord.v1 as pb
from accord.common import runner
from accord.common.transport import TransportSettings, bind, make_channel, make_server

#: Participant call timeout, as Accord's coordinator sets one on every call.
CALL_TIMEOUT_S = 5.0


async def _unimplemented(self: object, request: object, context: Any) -> Any:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of the baseline")


async def _unimplemented_stream(self: object, request: object, context: Any) -> AsyncIterator[Any]:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of the baseline")
    yield None  # pragma: no cover - makes this an async generator


class BareParticipant(pb.ParticipantServicer):
    """Votes yes, commits and executes saga steps without looking at the request. It
    has no ``Stream``: the baseline measures unary calls, and Accord's coordinator falls
    back to them for it (a participant that predates the stream transport)."""

    async def Stream(
        self, request_iterator: object, context: Any
    ) -> AsyncIterator[pb.BranchResultBatch]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of the baseline")
        yield pb.BranchResultBatch()  # pragma: no cover - makes this an async generator

    async def Prepare(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return pb.BranchResponse()

    async def Commit(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return pb.BranchResponse()

    async def Abort(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return pb.BranchResponse()

    async def Execute(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return pb.BranchResponse()

    async def Compensate(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return pb.BranchResponse()


class BareCoordinator(pb.CoordinatorServicer):
    """Execute = Prepare on every branch in parallel, then Commit on every branch in
    parallel. StartSaga = Execute on each step once its dependencies have returned.
    Nothing is validated, logged, retried, compensated or remembered."""

    Begin = Enlist = Commit = Abort = GetTransaction = ListTransactions = _unimplemented
    QueryOutcome = CancelSaga = RetryTransaction = _unimplemented
    WatchTransaction = Subscribe = _unimplemented_stream
    Session = _unimplemented_stream  # type: ignore[assignment]

    def __init__(self, services: dict[str, str], advertise: str) -> None:
        self._channels: list[aio.Channel] = []
        self._stubs: dict[str, Any] = {}
        for name, address in services.items():
            channel = make_channel(address)
            self._channels.append(channel)
            self._stubs[name] = self._stubs[address] = pb.ParticipantStub(channel)
        self._advertise = advertise
        self._seq = itertools.count(1)
        self._prefix = f"{os.getpid():x}"

    def _gid(self) -> tuple[int, str]:
        seq = next(self._seq)
        return seq, f"{self._prefix}-{seq:08x}"

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def Execute(self, request: pb.ExecuteRequest, context: Any) -> pb.TransactionResponse:
        seq, gid = self._gid()
        now_ms = int(time.time() * 1000)
        calls: list[tuple[Any, pb.BranchRequest]] = []
        for i, branch in enumerate(request.branches, 1):
            stub = self._stubs[branch.service or branch.address]
            calls.append(
                (
                    stub,
                    pb.BranchRequest(
                        gid=gid,
                        branch_id=branch.branch_id or f"b{i}",
                        operation=branch.operation,
                        payload=branch.payload,
                        shard="0",
                        epoch=1,
                        coordinator_address=self._advertise,
                    ),
                )
            )
        await asyncio.gather(*(s.Prepare(r, timeout=CALL_TIMEOUT_S) for s, r in calls))
        await asyncio.gather(*(s.Commit(r, timeout=CALL_TIMEOUT_S) for s, r in calls))
        return pb.TransactionResponse(
            transaction=pb.Transaction(
                gid=gid,
                protocol=pb.PROTOCOL_TWO_PHASE_COMMIT,
                state=pb.TXN_STATE_COMMITTED,
                branches=[
                    pb.BranchStatus(
                        branch=branch,
                        state=pb.BRANCH_STATE_COMMITTED,
                        attempts=2,
                        resolved_address=branch.address or branch.service,
                    )
                    for branch in request.branches
                ],
                idempotency_key=request.idempotency_key,
                created_unix_ms=now_ms,
                deadline_unix_ms=now_ms + 30_000,
                lsn=seq,
            )
        )

    async def StartSaga(self, request: pb.StartSagaRequest, context: Any) -> pb.TransactionResponse:
        seq, gid = self._gid()
        now_ms = int(time.time() * 1000)
        steps = request.definition.steps
        results: dict[str, bytes] = {}

        async def run(step: pb.SagaStep) -> None:
            stub = self._stubs[step.service or step.address]
            response = await stub.Execute(
                pb.BranchRequest(
                    gid=gid,
                    branch_id=step.name,
                    operation=step.action,
                    payload=step.payload,
                    shard="0",
                    epoch=1,
                    coordinator_address=self._advertise,
                ),
                timeout=step.timeout_ms / 1000 if step.timeout_ms else CALL_TIMEOUT_S,
            )
            results[step.name] = response.result

        # Wave by wave: every step whose dependencies have all returned runs now (in
        # parallel with the others of its wave); a chain is therefore sequential.
        pending = list(steps)
        while pending:
            ready = [s for s in pending if all(d in results for d in s.depends_on)]
            if not ready:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a DAG")
            if len(ready) == 1:
                await run(ready[0])
            else:
                await asyncio.gather(*(run(s) for s in ready))
            pending = [s for s in pending if s.name not in results]
        return pb.TransactionResponse(
            transaction=pb.Transaction(
                gid=gid,
                protocol=pb.PROTOCOL_SAGA,
                state=pb.TXN_STATE_COMPLETED,
                steps=[
                    pb.StepStatus(
                        step=step,
                        state=pb.BRANCH_STATE_SUCCEEDED,
                        attempts=1,
                        result=results[step.name],
                        resolved_address=step.address or step.service,
                    )
                    for step in steps
                ],
                idempotency_key=request.idempotency_key,
                created_unix_ms=now_ms,
                deadline_unix_ms=now_ms + 30_000,
                lsn=seq,
            )
        )


def parse_services(specs: Sequence[str]) -> dict[str, str]:
    """``NAME=HOST:PORT`` items as a dict."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, address = spec.partition("=")
        if not sep or not name or not address:
            raise ValueError(f"--service wants NAME=HOST:PORT, got {spec!r}")
        out[name] = address
    return out


async def serve(role: str, listen: str, services: dict[str, str]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    settings = TransportSettings.from_env()
    server, settings = make_server(settings)
    port = bind(server, listen, settings)
    if not port:
        raise OSError(f"cannot listen on {listen}")
    host = listen.rsplit(":", 1)[0]
    coordinator: BareCoordinator | None = None
    if role == "coordinator":
        coordinator = BareCoordinator(services, f"{host}:{port}")
        pb.add_CoordinatorServicer_to_server(coordinator, server)
    else:
        pb.add_ParticipantServicer_to_server(BareParticipant(), server)
    await server.start()
    print(f"listening on {host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop(1.0)
        if coordinator is not None:
            await coordinator.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.baseline",
        description="Bare grpc.aio 2PC and saga call patterns (the benchmark baselines).",
    )
    parser.add_argument("role", choices=["coordinator", "participant"])
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: any free)")
    parser.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="coordinator only: a participant (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        services = parse_services(args.service)
        if args.role == "coordinator" and not services:
            raise ValueError("the coordinator needs at least one --service")
        runner.run(serve(args.role, args.listen, services))
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:
        print(f"baseline {args.role}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
