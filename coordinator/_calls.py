"""Calls from the coordinator to participants: one channel per participant address,
reused; branch addresses resolved from the registry's local cache; the participant result
contract (DESIGN.md) turned into a three-way answer. Retrying is the engine's job."""

from __future__ import annotations

import enum
import itertools
import logging
from dataclasses import dataclass

import grpc
from grpc import aio

import accord.v1 as pb
from coordinator._errors import Unavailable
from registry import Registry
from registry.transport import TransportSettings, make_channel

log = logging.getLogger("accord.coordinator.calls")


class Verdict(enum.Enum):
    OK = "ok"  # yes / done
    NO = "no"  # ABORTED: a business no
    RETRY = "retry"  # not yet: try again later


@dataclass(frozen=True, slots=True)
class CallResult:
    verdict: Verdict
    read_only: bool = False
    detail: str = ""
    code: grpc.StatusCode = grpc.StatusCode.OK
    result: bytes = b""


_EXPECTED_RETRY = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)

METHODS = ("Prepare", "Commit", "Abort", "Execute", "Compensate")


class ParticipantCalls:
    """Sends branch requests; never raises for a participant's answer."""

    def __init__(self, *, registry: Registry, transport: TransportSettings | None = None) -> None:
        self._registry = registry
        self._transport = transport or TransportSettings.from_env()
        self._stubs: dict[str, pb.ParticipantStub] = {}
        self._channels: list[aio.Channel] = []
        self._rr = itertools.count()

    def resolve(self, service: str, address: str) -> str:
        """The address to send a branch to: its own, or a live instance of its service."""
        if address:
            return address
        instances = self._registry.instances(service)
        if not instances:
            raise Unavailable(f"no live instance of participant service {service!r}")
        return instances[next(self._rr) % len(instances)].address

    def known(self, service: str) -> bool:
        return bool(self._registry.instances(service))

    def _stub(self, address: str) -> pb.ParticipantStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = make_channel(address, self._transport)
            self._channels.append(channel)
            stub = self._stubs[address] = pb.ParticipantStub(channel)
        return stub

    async def call(
        self,
        method: str,
        address: str,
        request: pb.BranchRequest,
        attempt_s: float,
        *,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> CallResult:
        """``metadata``: the W3C trace context of the call's span (None: tracing off)."""
        stub = self._stub(address)
        rpc = getattr(stub, method)
        try:
            response: pb.BranchResponse = await rpc(request, timeout=attempt_s, metadata=metadata)
        except aio.AioRpcError as e:
            code = e.code()
            detail = f"{method} {request.branch_id}@{address}: {code.name}: {e.details()}"
            if code == grpc.StatusCode.ABORTED:
                return CallResult(Verdict.NO, detail=e.details() or "aborted", code=code)
            if code not in _EXPECTED_RETRY:
                log.warning("unexpected participant status, will retry: %s", detail)
            return CallResult(Verdict.RETRY, detail=detail, code=code)
        return CallResult(
            Verdict.OK,
            read_only=response.read_only,
            detail=response.message,
            result=response.result,
        )

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._channels.clear()
        self._stubs.clear()
