"""Values that cross the package boundary."""

from __future__ import annotations

from dataclasses import dataclass, field


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
