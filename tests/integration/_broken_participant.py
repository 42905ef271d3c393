"""A participant for the conformance kit's own tests: ``accord.v1.Participant`` with the
kit's operations (``conformance.add`` / ``conformance.get``) in memory, correct by
default, broken on purpose by ``--defect`` (repeatable):

- ``no-barrier``: no duplicate check (a duplicate Commit, Execute or Compensate applies
  again), and an Abort before its Prepare (a Compensate before its Execute) is not
  recorded, so the late call runs;
- ``ignores-epochs``: no fencing;
- ``wrong-codes``: a refusal (a no vote, a refused step) is answered INTERNAL;
- ``refusal-ok``: a refusal is answered OK (a no vote that looks like a yes).

No ``Stream`` (UNIMPLEMENTED: the kit skips it). A malformed payload or an unknown
operation is INVALID_ARGUMENT (the SDK answers ABORTED: the kit accepts both).

Run: ``python -m tests.integration._broken_participant --defect no-barrier``; prints
``listening on HOST:PORT``, serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import accord.v1 as pb

DEFECTS = ("no-barrier", "ignores-epochs", "wrong-codes", "refusal-ok")

OK = grpc.StatusCode.OK
ABORTED = grpc.StatusCode.ABORTED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
FENCED = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode
    message: str = ""
    read_only: bool = False
    result: bytes = b""


class Invalid(Exception):
    pass


def _add(req: pb.BranchRequest) -> tuple[str, int, str]:
    try:
        data: Any = json.loads(req.payload)
    except ValueError as e:
        raise Invalid(f"payload is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise Invalid("payload must be an object")
    key, amount, vote = data.get("key"), data.get("amount"), data.get("vote", "yes")
    if not isinstance(key, str) or not key or type(amount) is not int:
        raise Invalid("payload needs key (string) and amount (integer)")
    if vote not in ("yes", "no", "read-only"):
        raise Invalid(f"bad vote {vote!r}")
    return key, amount, vote


class Broken(pb.ParticipantServicer):
    def __init__(self, defects: set[str]) -> None:
        self.defects = defects
        self.values: dict[str, int] = {}
        #: (gid, branch, op) -> the recorded answer.
        self.barrier: dict[tuple[str, str, str], Answer] = {}
        #: (gid, branch) -> "PREPARED" | "COMMITTED" | "ABORTED" | "READ_ONLY"
        self.branches: dict[tuple[str, str], str] = {}
        self.fence: dict[str, int] = {}

    def refuse(self, message: str) -> Answer:
        if "wrong-codes" in self.defects:
            return Answer(grpc.StatusCode.INTERNAL, message)
        if "refusal-ok" in self.defects:
            return Answer(OK, message)
        return Answer(ABORTED, message)

    def _apply(self, key: str, delta: int) -> None:
        self.values[key] = self.values.get(key, 0) + delta

    def handle(self, op: str, req: pb.BranchRequest) -> Answer:
        if not req.gid or not req.branch_id:
            return Answer(INVALID, "gid and branch_id are required")
        if req.operation not in ("conformance.add", "conformance.get"):
            return Answer(INVALID, f"unknown operation {req.operation!r}")
        if req.shard and req.epoch and "ignores-epochs" not in self.defects:
            seen = self.fence.get(req.shard, 0)
            if req.epoch < seen:
                return Answer(FENCED, f"fenced: epoch {req.epoch} < {seen}")
            self.fence[req.shard] = req.epoch
        barrier = "no-barrier" not in self.defects
        key3 = (req.gid, req.branch_id, op)
        if barrier and key3 in self.barrier:
            return self.barrier[key3]
        try:
            answer = self._run(op, req, barrier)
        except Invalid as e:
            return Answer(INVALID, str(e))
        if barrier:
            self.barrier[key3] = answer
        return answer

    def _run(self, op: str, req: pb.BranchRequest, barrier: bool) -> Answer:
        branch = (req.gid, req.branch_id)
        if req.operation == "conformance.get":
            if op == "execute":
                data = json.loads(req.payload)
                key = data["key"]
                return Answer(
                    OK, result=json.dumps({"key": key, "value": self.values.get(key, 0)}).encode()
                )
            if op == "compensate":
                return Answer(OK)
            raise Invalid("conformance.get is a saga step")
        key, amount, vote = _add(req)
        if op == "prepare" or (op == "commit" and req.one_phase):
            if self.branches.get(branch) == "ABORTED":
                return self.refuse("already aborted")
            if vote == "no":
                self.branches[branch] = "ABORTED"
                return self.refuse("vote no")
            if vote == "read-only":
                self.branches[branch] = "READ_ONLY"
                return Answer(OK, read_only=True)
            if op == "commit":  # one-phase
                self._apply(key, amount)
                self.branches[branch] = "COMMITTED"
                return Answer(OK)
            self.branches[branch] = "PREPARED"
            return Answer(OK)
        if op == "commit":
            state = self.branches.get(branch)
            if state == "PREPARED" or (not barrier and state == "COMMITTED"):
                self._apply(key, amount)
                self.branches[branch] = "COMMITTED"
                return Answer(OK)
            return Answer(FENCED, f"cannot commit a branch {state or 'unknown'}")
        if op == "abort":
            if branch not in self.branches and barrier:
                self.branches[branch] = "ABORTED"  # recorded: the late Prepare is refused
            elif self.branches.get(branch) == "PREPARED":
                self.branches[branch] = "ABORTED"
            return Answer(OK)
        executed = self.barrier.get((req.gid, req.branch_id, "execute"))
        if op == "execute":
            if barrier and (req.gid, req.branch_id, "compensate") in self.barrier:
                return self.refuse("already compensated")
            if vote == "no":
                return self.refuse("refused")
            self._apply(key, amount)
            return Answer(OK)
        # compensate
        if barrier and (executed is None or executed.code != OK):
            return Answer(OK, "null compensation")
        self._apply(key, -amount)
        return Answer(OK)

    async def _unary(self, op: str, req: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        a = self.handle(op, req)
        if a.code != OK:
            context.set_code(a.code)
            context.set_details(a.message)
            return pb.BranchResponse()
        return pb.BranchResponse(read_only=a.read_only, message=a.message, result=a.result)

    async def Prepare(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return await self._unary("prepare", request, context)

    async def Commit(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return await self._unary("commit", request, context)

    async def Abort(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return await self._unary("abort", request, context)

    async def Execute(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return await self._unary("execute", request, context)

    async def Compensate(self, request: pb.BranchRequest, context: Any) -> pb.BranchResponse:
        return await self._unary("compensate", request, context)


async def main(defects: set[str], listen: str) -> None:
    server = aio.server()
    # No Stream method: the generated base class answers UNIMPLEMENTED.
    pb.add_ParticipantServicer_to_server(Broken(defects), server)  # type: ignore[abstract]
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port(listen)
    await server.start()
    for name in ("", "accord.v1.Participant"):
        await checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(f"listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--defect", action="append", choices=DEFECTS, default=[])
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args()
    asyncio.run(main(set(args.defect), args.listen))
