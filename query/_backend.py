"""What the read side offers to its front ends: the gRPC servicer (``_service``) and the
web console (``_http`` plus the console's pages) both speak to a :class:`QueryBackend`
and only translate to and from their transport.

Messages are the ``accord.v1`` protobufs of query.proto, so the console and the gRPC
API cannot drift apart. Errors are :class:`~accord.query.InvalidArgument` and
:class:`~accord.query.NotFound` (raised by ``list``/``get``/``stats``); a front end maps
them to its own status codes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import accord.v1 as pb


@dataclass(frozen=True, kw_only=True)
class ShardHealth:
    """One shard's feed as the query service follows it."""

    shard: str
    coordinator: str  # the address subscribed to ("" when there is none now)
    connected: bool
    applied_lsn: int
    durable_lsn: int
    lag_events: int
    lag_seconds: float

    def to_dict(self) -> dict[str, object]:
        return {
            "shard": self.shard,
            "coordinator": self.coordinator,
            "connected": self.connected,
            "applied_lsn": self.applied_lsn,
            "durable_lsn": self.durable_lsn,
            "lag_events": self.lag_events,
            "lag_seconds": round(self.lag_seconds, 3),
        }


@dataclass(frozen=True, kw_only=True)
class Health:
    """``healthy``: every shard connected and behind by less than the threshold."""

    healthy: bool
    shards: tuple[ShardHealth, ...] = ()
    max_lag_events: int = 0
    reasons: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, object]:
        return {
            "healthy": self.healthy,
            "max_lag_events": self.max_lag_events,
            "reasons": list(self.reasons),
            "shards": [s.to_dict() for s in self.shards],
        }


class QueryBackend(Protocol):
    """The read model behind every front end of ``accord query``."""

    async def list(self, req: pb.QueryListRequest) -> pb.QueryListResponse:
        """Transactions matching ``req.filter`` in ``req.order``, one page (InvalidArgument
        for an unknown filter value, a page size over 1000, a bad cursor)."""
        ...

    async def get(self, gid: str) -> pb.TransactionView:
        """One transaction with its whole timeline (NotFound for an unknown gid)."""
        ...

    async def stats(self, req: pb.StatsRequest) -> pb.StatsResponse:
        """Counts by state, per-minute throughput and latency, lag per shard."""
        ...

    def changes(self, *, buffer: int = 1024) -> AsyncIterator[pb.TransactionSummary]:
        """Every transaction as it is after each change applied from now on (one summary
        per change, in the order applied). A subscriber that falls more than ``buffer``
        changes behind is dropped: the iterator ends, and the subscriber re-reads the list
        and subscribes again (the console's SSE stream closes; the browser reconnects)."""
        ...

    def health(self) -> Health:
        """Per-shard feed positions and whether the service is healthy (``/healthz``)."""
        ...

    def coordinator_for(self, shard: str) -> str:
        """The address of the coordinator that owns ``shard`` as far as the followers know
        ("" when none): where operator actions (RetryTransaction, CancelSaga) go."""
        ...
