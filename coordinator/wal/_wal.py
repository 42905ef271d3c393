"""The ``WAL`` facade: open (lock + recovery), submit/append, checkpoint, close."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from .._failpoints import Failpoints
from ._checkpoint import remove_checkpoints_except, write_checkpoint_file
from ._errors import WalError
from ._files import make_dirs
from ._format import (
    FIRST_USER_RTYPE,
    MAX_PAYLOAD,
    MAX_RTYPE,
    RECORD_HEADER_SIZE,
    RTYPE_CHECKPOINT,
    SEGMENT_HEADER_SIZE,
    encode_checkpoint_record,
)
from ._lock import DirectoryLock
from ._recovery import Recovery, recover
from ._segment import SegmentLog
from ._types import FeedSink, RecoveredLog, WalStats
from ._writer import GroupCommitWriter

logger = logging.getLogger("accord.coordinator.wal")

DEFAULT_SEGMENT_SIZE: Final = 64 * 1024 * 1024
MIN_SEGMENT_SIZE: Final = SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE


class WAL:
    """A durable, segmented write-ahead log owned by one process. Use ``WAL.open``."""

    def __init__(
        self,
        *,
        directory: Path,
        lock: DirectoryLock,
        log: SegmentLog,
        io: ThreadPoolExecutor,
        spare: ThreadPoolExecutor,
        recovery: Recovery,
        on_fatal: Callable[[BaseException], None] | None,
        on_sync: Callable[[int, float], None] | None,
        feed: FeedSink | None = None,
    ) -> None:
        self._dir = directory
        self._feed = feed
        self._lock = lock
        self._log = log
        # One I/O thread: SegmentLog is thread-confined, and fsync stalls never occupy
        # the loop's default executor. A second thread prepares spare segment files.
        self._io = io
        self._spare = spare
        self._writer = GroupCommitWriter(log, io, on_fatal=on_fatal, on_sync=on_sync, feed=feed)
        self._next_lsn = recovery.next_lsn
        self._checkpoint_lsn: int | None = (
            recovery.checkpoint_lsn if recovery.checkpoint is not None else None
        )
        self._checkpoint_lock = asyncio.Lock()
        self._checkpoints = 0
        self._closed = False
        self._close_task: asyncio.Future[None] | None = None

    @classmethod
    async def open(
        cls,
        directory: Path,
        *,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        failpoints: Failpoints | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        on_sync: Callable[[int, float], None] | None = None,
        slow_fsync_warn_s: float = 0.5,
        sync_marker: bool = False,
        feed: FeedSink | None = None,
    ) -> tuple[WAL, RecoveredLog]:
        """Lock ``directory`` (created if missing), recover it, and start the writer.

        Raises WalLockedError if another WAL owns the directory, WalCorruptionError if
        the log is damaged anywhere but a torn tail (which is repaired, see ``repaired``).
        ``feed`` hears of every record once it is durable (the event feed).
        """
        directory = Path(directory)
        if segment_size < MIN_SEGMENT_SIZE:
            raise WalError(f"wal: segment_size {segment_size} below {MIN_SEGMENT_SIZE}")
        io = ThreadPoolExecutor(1, thread_name_prefix="wal-io")
        spare = ThreadPoolExecutor(1, thread_name_prefix="wal-spare")

        def blocking_open() -> tuple[DirectoryLock, Recovery, SegmentLog]:
            make_dirs(directory)
            lock = DirectoryLock.acquire(directory)
            try:
                recovery = recover(directory, segment_size)
                log = SegmentLog(
                    directory,
                    segment_size=segment_size,
                    failpoints=failpoints,
                    slow_fsync_warn_s=slow_fsync_warn_s,
                    spare_executor=spare,
                    segments=recovery.segments,
                    tail_offset=recovery.tail_offset,
                    tail_capacity=recovery.tail_capacity,
                    crc=recovery.crc,
                    next_lsn=recovery.next_lsn,
                    sync_marker=sync_marker,
                )
            except BaseException:
                lock.release()
                raise
            return lock, recovery, log

        try:
            lock, recovery, log = await asyncio.get_running_loop().run_in_executor(
                io, blocking_open
            )
        except BaseException:
            io.shutdown(wait=False)
            spare.shutdown(wait=False)
            raise
        for note in recovery.notes:
            logger.warning("event=wal_recovery_note note=%r", note)
        wal = cls(
            directory=directory,
            lock=lock,
            log=log,
            io=io,
            spare=spare,
            recovery=recovery,
            on_fatal=on_fatal,
            on_sync=on_sync,
            feed=feed,
        )
        if feed is not None:
            # Recovery made everything it found durable (SegmentLog fsyncs the tail).
            feed.opened(recovery.next_lsn - 1, wal._checkpoint_lsn or 0, wal._writer.poke)
        wal._writer.start()
        recovered = RecoveredLog(
            checkpoint=recovery.checkpoint,
            checkpoint_lsn=recovery.checkpoint_lsn,
            records=recovery.records,
            repaired=recovery.notes,
        )
        return wal, recovered

    # --- appending --------------------------------------------------------------------

    @property
    def last_lsn(self) -> int:
        """The last LSN assigned (not necessarily written yet)."""
        return self._next_lsn - 1

    @property
    def directory(self) -> Path:
        return self._dir

    def submit(self, rtype: int, payload: bytes, *, sync: bool) -> tuple[int, asyncio.Future[None]]:
        """Queue a record; its LSN is assigned now. ``done`` resolves once the record is
        written (``sync=False``: in the page cache) or durable (``sync=True``), or fails
        with WalFatalError. Must be called on the event loop that opened the WAL."""
        if not FIRST_USER_RTYPE <= rtype <= MAX_RTYPE:
            raise WalError(f"wal: record type {rtype} outside {FIRST_USER_RTYPE}..{MAX_RTYPE}")
        return self._submit(rtype, payload, sync)

    async def append(self, rtype: int, payload: bytes, *, sync: bool) -> int:
        """``submit`` and wait for it; returns the LSN."""
        lsn, done = self.submit(rtype, payload, sync=sync)
        await done
        return lsn

    def _submit(self, rtype: int, payload: bytes, sync: bool) -> tuple[int, asyncio.Future[None]]:
        if self._closed:
            raise WalError("wal: the log is closed")
        self._writer.check_usable()
        if len(payload) > MAX_PAYLOAD:
            raise WalError(f"wal: payload of {len(payload)} bytes over the {MAX_PAYLOAD} limit")
        if not isinstance(payload, bytes):
            payload = bytes(payload)  # a snapshot: the caller may reuse its buffer
        lsn = self._next_lsn
        done = self._writer.enqueue(lsn, rtype, payload, sync)
        self._next_lsn = lsn + 1
        return lsn, done

    # --- checkpoints ------------------------------------------------------------------

    async def checkpoint(self, image: bytes, lsn: int) -> None:
        """Make ``image`` (reflecting every record <= ``lsn``) the recovery starting
        point, then delete the segments and checkpoint files it makes unnecessary.

        A checkpoint at the current checkpoint's LSN is a no-op; an older one is refused.
        """
        if not 0 <= lsn <= self.last_lsn:
            raise WalError(f"wal: checkpoint lsn {lsn} outside 0..{self.last_lsn}")
        async with self._checkpoint_lock:
            if self._closed:
                raise WalError("wal: the log is closed")
            self._writer.check_usable()
            current = self._checkpoint_lsn
            if current is not None and lsn <= current:
                if lsn < current:
                    raise WalError(f"wal: checkpoint lsn {lsn} is older than {current}")
                return
            try:
                if not isinstance(image, bytes):
                    image = bytes(image)  # a snapshot: written from another thread
                ref = await asyncio.to_thread(write_checkpoint_file, self._dir, lsn, image)
            except OSError as exc:
                raise WalError(f"wal: writing checkpoint lsn {lsn} failed: {exc}") from exc
            # The file is live only once this record is durable; a crash before that
            # leaves an unreferenced file that the next open removes.
            _, done = self._submit(RTYPE_CHECKPOINT, encode_checkpoint_record(ref), True)
            await done
            self._checkpoint_lsn = lsn
            self._checkpoints += 1
            if self._feed is not None:
                self._feed.checkpointed(lsn)  # before any segment it covers is deleted
            loop = asyncio.get_running_loop()
            deleted = await loop.run_in_executor(self._io, self._log.delete_through, lsn)
            removed = await asyncio.to_thread(remove_checkpoints_except, self._dir, lsn)
            logger.debug(
                "event=wal_checkpoint lsn=%d deleted_segments=%s deleted_checkpoints=%s",
                lsn,
                deleted,
                removed,
            )

    # --- closing ----------------------------------------------------------------------

    async def close(self) -> None:
        """Write and sync what is pending, close the files, release the lock.
        Safe to call twice (the second call waits for the first)."""
        if self._close_task is None:
            self._closed = True
            self._close_task = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._close_task)

    async def _shutdown(self) -> None:
        try:
            async with self._checkpoint_lock:  # let a running checkpoint finish its cleanup
                await self._writer.stop()
                await asyncio.get_running_loop().run_in_executor(self._io, self._log.close)
        finally:
            self._lock.release()
            self._io.shutdown(wait=False)
            self._spare.shutdown(wait=False)

    async def __aenter__(self) -> WAL:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- observability ----------------------------------------------------------------

    @property
    def stats(self) -> WalStats:
        meter = self._log.meter
        return WalStats(
            records=self._writer.records,
            bytes=self._log.bytes_written,
            batches=self._writer.batches,
            syncs=meter.syncs,
            max_batch=self._writer.max_batch,
            fsync_total_s=meter.total_s,
            fsync_max_s=meter.max_s,
            segments_created=self._log.segments_created,
            segments_deleted=self._log.segments_deleted,
            checkpoints=self._checkpoints,
        )

    @property
    def fatal(self) -> bool:
        """True once the log has failed (fail-stop)."""
        try:
            self._writer.check_usable()
        except WalError:
            return True
        return False
