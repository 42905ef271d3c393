"""Calls from the coordinator to participants: one channel per participant address,
reused; branch addresses resolved from the registry's local cache; the participant result
contract (DESIGN.md) turned into a three-way answer. Retrying is the engine's job.

Routing: a branch named by service keeps to the instance it started on while that
instance is live (registered) and answering; when its key is gone, or a call to it
fails as UNAVAILABLE, the next attempt goes to another live instance of the same
service. Instances registered under one service name must therefore share their state
(one database behind several processes): any phase of a branch may reach any of them."""

from __future__ import annotations

import enum
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc import aio

import accord.v1 as pb
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

    def __init__(
        self,
        *,
        registry: Registry,
        transport: TransportSettings | None = None,
        on_fenced: Callable[[str], None] | None = None,
    ) -> None:
        self._registry = registry
        self._on_fenced = on_fenced
        self._transport = transport or TransportSettings.from_env()
        self._stubs: dict[str, pb.ParticipantStub] = {}
        self._channels: list[aio.Channel] = []
        self._rr = itertools.count()

    def resolve(self, service: str, address: str) -> str:
        """The address to start a branch on: its own, or a live instance of its service
        (round robin), or "" when none is live right now."""
        return address or self._pick(service, "", "")

    def known(self, service: str) -> bool:
        return self._registry.known(service)

    def describe(self) -> str:
        return self._registry.describe()

    def _pick(self, service: str, current: str, avoid: str) -> str:
        instances = self._registry.instances(service)
        if not instances:
            return ""
        if current and not avoid:
            for inst in instances:
                if inst.address == current:
                    return current
        choices = [i for i in instances if i.address != avoid] or instances
        return choices[next(self._rr) % len(choices)].address

    async def send(
        self,
        method: str,
        service: str,
        address: str,
        current: str,
        request: pb.BranchRequest,
        attempt_s: float,
        *,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> tuple[CallResult, str]:
        """One attempt of a branch call, routed as the module docstring says. Returns
        the answer and the address the next attempt should use."""
        # With no live instance known, the last address used is still worth a try: the
        # instance may be alive while the registry (etcd) is down or lagging.
        target = address or self._pick(service, current, "") or current
        if not target:
            detail = (
                f"no live instance of participant service {service!r} "
                f"(registry: {self._registry.describe()})"
            )
            return CallResult(Verdict.RETRY, detail=detail, code=grpc.StatusCode.UNAVAILABLE), ""
        result = await self.call(method, target, request, attempt_s, metadata=metadata)
        if result.code == grpc.StatusCode.UNAVAILABLE and not address:
            other = self._pick(service, target, target)
            if other != target:
                log.info(
                    "event=failover gid=%s branch=%s service=%s from=%s to=%s",
                    request.gid,
                    request.branch_id,
                    service,
                    target,
                    other,
                )
            return result, other or target
        return result, target

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
            if (
                code == grpc.StatusCode.FAILED_PRECONDITION
                and (e.details() or "").startswith("fenced:")
                and self._on_fenced is not None
            ):
                # A participant has seen a newer owner of this shard.
                self._on_fenced(detail)
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
