"""The segment files: preallocation, the spare-file pipeline, appends, syncs, rolls, deletes.

Everything here is blocking and *thread-confined*: ``SegmentLog`` is driven by exactly one
I/O thread (the WAL's single-worker executor), so it needs no locks. The event loop never
runs any of it directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .._failpoints import Failpoint, Failpoints
from ._errors import WalFatalError
from ._files import TMP_SUFFIX, fsync_dir, pwrite_all
from ._format import (
    SEGMENT_HEADER_SIZE,
    encode_record,
    encode_segment_header,
    record_size,
    segment_name,
)

logger = logging.getLogger("accord.coordinator.wal")

#: The sync marker file of a directory opened with ``sync_marker=True``.
SYNC_MARKER: Final = "SYNCED"

SPARE_NAME: Final = "spare.wal" + TMP_SUFFIX


def prune_segments(segments: list[tuple[int, Path]], lsn: int) -> list[Path]:
    """Unlink the oldest segments whose records are all <= ``lsn``; never the last one.

    A segment's records run from its first LSN to the next segment's first LSN minus one,
    so it may go when the next one starts at or before ``lsn + 1``. Oldest first: if a
    crash interrupts, what is left is still a contiguous run (recovery also copes with a
    leftover older segment, see ``_recovery``). Mutates ``segments``.
    """
    deleted: list[Path] = []
    while len(segments) > 1 and segments[1][0] <= lsn + 1:
        _first, path = segments.pop(0)
        path.unlink(missing_ok=True)
        deleted.append(path)
    if deleted:
        fsync_dir(deleted[0].parent)
    return deleted


class SparePipeline:
    """Keeps one preallocated file ready, so a roll does not wait for the allocation.

    (etcd's file pipeline.) The spare is prepared on its own executor while the writer
    keeps appending to the current segment.
    """

    def __init__(self, directory: Path, size: int, executor: Executor) -> None:
        self._path = directory / SPARE_NAME
        self._size = size
        self._executor = executor
        self._future: Future[int] | None = None

    def _prepare(self) -> int:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.posix_fallocate(fd, 0, self._size)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def start(self) -> None:
        if self._future is None:
            self._future = self._executor.submit(self._prepare)

    def take(self) -> tuple[int, Path]:
        """A preallocated file (fd, temp path); the caller renames it into place."""
        future, self._future = self._future, None
        fd = future.result() if future is not None else self._prepare()
        return fd, self._path

    def close(self) -> None:
        future, self._future = self._future, None
        if future is None:
            return
        with contextlib.suppress(OSError):
            os.close(future.result())
        self._path.unlink(missing_ok=True)


@dataclass(slots=True)
class _Active:
    fd: int
    path: Path
    first_lsn: int
    offset: int
    """Where the next record goes."""
    capacity: int
    """Preallocated size of the file."""


@dataclass(slots=True)
class SyncMeter:
    syncs: int = 0
    total_s: float = 0.0
    max_s: float = 0.0


class SegmentLog:
    """The append side of the segmented log. Driven by one thread only."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_size: int,
        failpoints: Failpoints | None,
        slow_fsync_warn_s: float,
        spare_executor: Executor,
        segments: list[tuple[int, Path]],
        tail_offset: int,
        tail_capacity: int,
        crc: int,
        next_lsn: int,
        sync_marker: bool = False,
    ) -> None:
        """Continue the log after recovery: ``segments`` is the recovered list (possibly
        empty: then the first segment is created here, named after ``next_lsn``)."""
        self._dir = directory
        self._segment_size = segment_size
        self._failpoints = failpoints
        self._slow_s = slow_fsync_warn_s
        self._segments = segments
        self._crc = crc
        self._written_lsn = next_lsn - 1
        # Highest LSN covered by a completed fdatasync; stamped into every record header
        # so recovery can prove that damage before a later record is not a torn write.
        self._synced_lsn = next_lsn - 1
        self._marker_fd = (
            os.open(directory / SYNC_MARKER, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            if sync_marker
            else -1
        )
        self._mark()
        self._dirty = False
        self.meter = SyncMeter()
        self.bytes_written = 0
        self.segments_created = 0
        self.segments_deleted = 0
        self._spare = SparePipeline(directory, segment_size, spare_executor)
        self._active: _Active | None = None
        if segments:
            path = segments[-1][1]
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            self._active = _Active(fd, path, segments[-1][0], tail_offset, tail_capacity)
            # What recovery read may only be in the page cache (after a process crash):
            # make it durable before anything is appended after it.
            os.fsync(fd)
        else:
            self._roll(next_lsn, 0)
        self._spare.start()

    @property
    def dirty(self) -> bool:
        return self._dirty

    # --- appending --------------------------------------------------------------------

    def write_batch(self, items: Sequence[tuple[int, int, bytes]]) -> int:
        """Encode and write ``(lsn, rtype, payload)`` items in order; returns bytes written.

        One ``pwrite`` per segment touched. Rolls when a record does not fit.
        """
        active = self._require_active()
        parts: list[bytes] = []
        start = active.offset
        written = 0
        for lsn, rtype, payload in items:
            size = record_size(len(payload))
            if active.offset + size > active.capacity:
                if parts:
                    written += self._write(active, parts, start)
                    parts = []
                if active.offset == SEGMENT_HEADER_SIZE:
                    self._grow(active, SEGMENT_HEADER_SIZE + size)
                else:
                    self._roll(lsn, size)
                    active = self._require_active()
                start = active.offset
            rec, self._crc = encode_record(lsn, rtype, payload, self._synced_lsn, self._crc)
            parts.extend(rec)
            active.offset += size
            self._written_lsn = lsn
        if parts:
            written += self._write(active, parts, start)
        return written

    def sync(self) -> float:
        """fdatasync the active segment if anything is unsynced; returns its duration."""
        if not self._dirty:
            return 0.0
        return self._datasync(self._require_active())

    def _write(self, active: _Active, parts: list[bytes], offset: int) -> int:
        data = b"".join(parts)
        try:
            if self._failpoints is not None:
                self._failpoints.check(Failpoint.WAL_BEFORE_WRITE)
            pwrite_all(active.fd, data, offset)
        except Exception as exc:
            raise WalFatalError(
                f"wal: write to segment {active.path.name} at offset {offset} failed: {exc}"
            ) from exc
        self._dirty = True
        self.bytes_written += len(data)
        return len(data)

    def _datasync(self, active: _Active) -> float:
        try:
            if self._failpoints is not None:
                self._failpoints.check(Failpoint.WAL_FSYNC)
            t0 = time.perf_counter()
            os.fdatasync(active.fd)
            elapsed = time.perf_counter() - t0
        except Exception as exc:
            # Never retried: after a failed fsync the kernel may have dropped the dirty
            # pages, so a retry that "succeeds" would lie about durability.
            raise WalFatalError(
                f"wal: fdatasync of segment {active.path.name} failed: {exc}"
            ) from exc
        self._dirty = False
        self._synced_lsn = self._written_lsn
        self._mark()
        m = self.meter
        m.syncs += 1
        m.total_s += elapsed
        m.max_s = max(m.max_s, elapsed)
        if elapsed >= self._slow_s:
            logger.warning(
                'event=slow_fdatasync segment=%s seconds=%.3f msg="wal: slow fdatasync"',
                active.path.name,
                elapsed,
            )
        return elapsed

    # --- segment files ----------------------------------------------------------------

    def _mark(self) -> None:
        if self._marker_fd >= 0:
            # Fixed width, so a shorter number never leaves digits of a longer one.
            os.pwrite(self._marker_fd, b"%020d\n" % self._synced_lsn, 0)

    def _require_active(self) -> _Active:
        if self._active is None:
            raise WalFatalError("wal: no active segment (the log is closed)")
        return self._active

    def _grow(self, active: _Active, capacity: int) -> None:
        """An empty segment too small for one record: enlarge it instead of rolling
        (a roll would create a second file with the same first LSN)."""
        try:
            os.posix_fallocate(active.fd, 0, capacity)
        except OSError as exc:
            raise WalFatalError(f"wal: growing segment {active.path.name} failed: {exc}") from exc
        active.capacity = capacity

    def _roll(self, first_lsn: int, record_bytes: int) -> None:
        """Start segment ``first_lsn``: the old one is made durable first, so a segment
        other than the last never has a torn tail; the new one appears under its name
        only once its header is durable (temp file, fdatasync, rename, fsync dir)."""
        old = self._active
        if old is not None:
            if self._dirty:
                self._datasync(old)
            os.close(old.fd)
            self._active = None
        capacity = max(self._segment_size, SEGMENT_HEADER_SIZE + record_bytes)
        path = self._dir / segment_name(first_lsn)
        try:
            fd, tmp = self._spare.take()
        except OSError as exc:
            raise WalFatalError(f"wal: preparing segment {path.name} failed: {exc}") from exc
        try:
            if capacity > self._segment_size:
                os.posix_fallocate(fd, 0, capacity)
            pwrite_all(fd, encode_segment_header(first_lsn, self._crc), 0)
            os.fdatasync(fd)
            os.rename(tmp, path)
            fsync_dir(self._dir)
        except OSError as exc:
            os.close(fd)
            raise WalFatalError(f"wal: creating segment {path.name} failed: {exc}") from exc
        self._active = _Active(fd, path, first_lsn, SEGMENT_HEADER_SIZE, capacity)
        self._segments.append((first_lsn, path))
        self.segments_created += 1
        self._spare.start()

    def delete_through(self, lsn: int) -> list[str]:
        """Delete segments whose records are all <= ``lsn`` (never the active one)."""
        deleted = prune_segments(self._segments, lsn)
        self.segments_deleted += len(deleted)
        return [p.name for p in deleted]

    def close(self) -> None:
        """Close the files (no sync: the writer has synced). Safe to call twice."""
        active, self._active = self._active, None
        if active is not None:
            os.close(active.fd)
        if self._marker_fd >= 0:
            os.close(self._marker_fd)
            self._marker_fd = -1
        self._spare.close()
