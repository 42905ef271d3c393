"""Values that cross the package boundary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class WalRecord:
    lsn: int
    rtype: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class RecoveredLog:
    """What ``WAL.open`` found on disk."""

    checkpoint: bytes | None
    """Image of the newest checkpoint, or None."""
    checkpoint_lsn: int
    """The image reflects every record up to this LSN (0 without a checkpoint)."""
    records: list[WalRecord] = field(default_factory=list)
    """Every record with lsn > checkpoint_lsn, in order (the WAL's own records left out)."""
    repaired: list[str] = field(default_factory=list)
    """Human-readable notes of the repairs done at open (for logs)."""


@dataclass(frozen=True, slots=True)
class WalStats:
    """Counters since open."""

    records: int = 0
    bytes: int = 0
    """Bytes written to segments (headers and padding included)."""
    batches: int = 0
    """Group-commit batches written (one write per segment touched)."""
    syncs: int = 0
    """fdatasync calls on segment data (batch syncs, syncs before a roll, the final one)."""
    max_batch: int = 0
    """Most records written in one batch."""
    fsync_total_s: float = 0.0
    fsync_max_s: float = 0.0
    segments_created: int = 0
    segments_deleted: int = 0
    checkpoints: int = 0


class FeedSink(Protocol):
    """Who hears of durable records (the event feed's hub, ``accord.coordinator._feed``).
    Called on the event loop; each call must be cheap and must not block or await."""

    def opened(self, durable_lsn: int, checkpoint_lsn: int, flush: Callable[[], None]) -> None:
        """At open: every record up to ``durable_lsn`` is durable; the live checkpoint
        (0: none) reflects every record up to ``checkpoint_lsn``. ``flush()`` asks the
        writer to make its unsynced tail durable soon (call it when a subscriber starts
        waiting: the writer only looks at ``waiting`` when it has work)."""

    def durable(self, records: list[tuple[int, int, bytes]], durable_lsn: int) -> None:
        """``records`` (lsn, rtype, payload; every type, in LSN order, following the
        previous call's without a gap) are durable, up to ``durable_lsn``."""

    def checkpointed(self, lsn: int) -> None:
        """A checkpoint reflecting every record up to ``lsn`` is live (its CHECKPOINT
        record is durable); older segments may be deleted from now on."""

    @property
    def waiting(self) -> bool:
        """True while a subscriber waits for records: unsynced ones are synced soon."""
