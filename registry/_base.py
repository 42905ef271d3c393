"""The registry interface: how the coordinator finds participant instances by service
name. The static implementation serves single-node use; the etcd one (leases, keepalive,
watch) fills the same interface."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, kw_only=True)
class Instance:
    service: str
    instance_id: str
    address: str
    operations: tuple[str, ...] = field(default=())
    version: str = ""


class NoInstanceError(LookupError):
    """No live instance of a service is known (right now)."""


class Registry(Protocol):
    """Read side used on the hot path: answers from a local cache, never a round trip."""

    def instances(self, service: str) -> Sequence[Instance]:
        """Live instances of service, possibly empty."""
        ...

    def known(self, service: str) -> bool:
        """The service has had a live instance (it may have none right now)."""
        ...

    def describe(self) -> str:
        """Where answers come from and how fresh they are, for error messages."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...
