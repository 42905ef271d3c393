"""Fakes for the fast unit tier only; integration tests run the real WAL, gRPC and
participants."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import accord.v1 as pb
from accord.coordinator._calls import CallResult, Verdict


@dataclass
class FakeWal:
    """Records what was submitted; durability is released by the test (or at once)."""

    auto: bool = True
    records: list[tuple[int, int, bytes, bool]] = field(default_factory=list)
    pending: list[asyncio.Future[None]] = field(default_factory=list)
    checkpoints: list[tuple[bytes, int]] = field(default_factory=list)

    @property
    def last_lsn(self) -> int:
        return len(self.records)

    def submit(self, rtype: int, payload: bytes, *, sync: bool) -> tuple[int, asyncio.Future[None]]:
        self.records.append((len(self.records) + 1, rtype, payload, sync))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.auto:
            fut.set_result(None)
        else:
            self.pending.append(fut)
        return len(self.records), fut

    def release(self) -> None:
        for f in self.pending:
            if not f.done():
                f.set_result(None)
        self.pending.clear()

    async def checkpoint(self, image: bytes, lsn: int) -> None:
        self.checkpoints.append((image, lsn))


@dataclass
class FakeCalls:
    """A scripted participant: answers per (method, branch_id), default OK."""

    answers: dict[tuple[str, str], list[CallResult]] = field(default_factory=dict)
    log: list[tuple[str, str, str]] = field(default_factory=list)

    def resolve(self, service: str, address: str) -> str:
        return address or f"{service}:1"

    def known(self, service: str) -> bool:
        return service != "nowhere"

    def describe(self) -> str:
        return "fake"

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
        target = current or self.resolve(service, address)
        return await self.call(method, target, request, attempt_s, metadata=metadata), target

    async def call(
        self,
        method: str,
        address: str,
        request: pb.BranchRequest,
        attempt_s: float,
        *,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> CallResult:
        self.log.append((method, request.branch_id, request.gid))
        script = self.answers.get((method, request.branch_id))
        if script:
            return script.pop(0) if len(script) > 1 else script[0]
        return CallResult(Verdict.OK)


class FakeClock:
    def __init__(self, now_ms: int = 1_700_000_000_000) -> None:
        self.now = now_ms

    def now_ms(self) -> int:
        return self.now
