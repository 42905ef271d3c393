"""Group commit: one writer task drains the queue; one write and at most one fdatasync
per batch; then every waiter of the batch is answered.

While a batch is being written or synced (in the I/O thread, never on the event loop),
new submissions queue up and form the next batch, so under load the number of fsyncs
per record falls on its own. Fail-stop: the first failed write or fdatasync stops the
writer for good; no waiter is ever told "durable" after that.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Final, TypeVar

from ._errors import WalFatalError
from ._format import record_size
from ._segment import SegmentLog
from ._types import FeedSink

logger = logging.getLogger("accord.coordinator.wal")

MAX_BATCH_BYTES: Final = 8 * 1024 * 1024
"""A batch stops growing here (it always takes at least one record)."""

FEED_FLUSH_S: Final = 0.05
"""With a feed subscriber waiting, records written without a sync (presumed-abort
records, saga results, END) are fdatasync'ed after this long idle, so the feed, which
only carries durable records, does not hold them back until the next forced record."""

_T = TypeVar("_T")


@dataclass(slots=True)
class _Pending:
    lsn: int
    rtype: int
    payload: bytes
    sync: bool
    future: asyncio.Future[None]


class GroupCommitWriter:
    def __init__(
        self,
        log: SegmentLog,
        io: Executor,
        *,
        on_fatal: Callable[[BaseException], None] | None,
        on_sync: Callable[[int, float], None] | None,
        feed: FeedSink | None = None,
    ) -> None:
        self._log = log
        self._feed = feed
        #: Written, not yet known durable: (lsn, rtype, payload), for the feed only.
        self._written: list[tuple[int, int, bytes]] = []
        self._io = io
        self._on_fatal = on_fatal
        self._on_sync = on_sync
        self._queue: deque[_Pending] = deque()
        self._inflight: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._fatal: WalFatalError | None = None
        self._task: asyncio.Task[None] | None = None
        self.records = 0
        self.batches = 0
        self.max_batch = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="wal-writer")

    def check_usable(self) -> None:
        if self._fatal is not None:
            raise self._fatal_error()

    def enqueue(self, lsn: int, rtype: int, payload: bytes, sync: bool) -> asyncio.Future[None]:
        self.check_usable()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(lsn, rtype, payload, sync, future))
        self._wakeup.set()
        return future

    def poke(self) -> None:
        """Look again (a feed subscriber started waiting: sync the unsynced tail)."""
        self._wakeup.set()

    async def stop(self) -> None:
        """Write and sync everything queued, then end the writer task."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None and not self._task.done():
            # wait() neither raises the task's outcome nor cancels it if we are cancelled.
            await asyncio.wait({self._task})

    # --- the writer task --------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                if self._queue:
                    await self._commit(self._take_batch())
                elif self._stopping:
                    if self._log.dirty:  # sync=False records still only in the page cache
                        await self._in_io(self._log.sync)
                    self._publish()
                    return
                elif self._written and self._feed is not None and self._feed.waiting:
                    await self._flush_when_idle()
                else:
                    self._wakeup.clear()
                    await self._wakeup.wait()
        except asyncio.CancelledError:
            self._fail(WalFatalError("wal: writer task cancelled; the log is stopped"), False)
            raise
        except BaseException as exc:
            self._fail(exc, True)
            if not isinstance(exc, Exception):
                raise

    def _take_batch(self) -> list[_Pending]:
        first = self._queue.popleft()
        batch = [first]
        size = record_size(len(first.payload))
        while self._queue:
            more = record_size(len(self._queue[0].payload))
            if size + more > MAX_BATCH_BYTES:
                break
            batch.append(self._queue.popleft())
            size += more
        return batch

    async def _flush_when_idle(self) -> None:
        """Unsynced records and a feed subscriber waiting: sync them unless more work
        comes within FEED_FLUSH_S (its batch's sync will cover them)."""
        self._wakeup.clear()
        try:
            async with asyncio.timeout(FEED_FLUSH_S):
                await self._wakeup.wait()
        except TimeoutError:
            await self._in_io(self._log.sync)
            self._publish()

    def _publish(self) -> None:
        """Everything written so far is durable now: hand it to the feed."""
        written = self._written
        if not written or self._feed is None:
            return
        self._written = []
        try:
            self._feed.durable(written, written[-1][0])
        except Exception:
            logger.exception("event=wal_feed_failed")

    async def _commit(self, batch: list[_Pending]) -> None:
        self._inflight = batch
        items = [(p.lsn, p.rtype, p.payload) for p in batch]
        await self._in_io(self._log.write_batch, items)
        if self._feed is not None:
            self._written.extend(items)
        self.records += len(batch)
        self.batches += 1
        self.max_batch = max(self.max_batch, len(batch))
        # sync=False asks only for the write (page cache); answer it now, before the sync.
        needs_sync = False
        for p in batch:
            if p.sync:
                needs_sync = True
            elif not p.future.done():
                p.future.set_result(None)
        if needs_sync:
            seconds = await self._in_io(self._log.sync)
            self._publish()
            for p in batch:
                if p.sync and not p.future.done():
                    p.future.set_result(None)
            if self._on_sync is not None:
                try:
                    self._on_sync(len(batch), seconds)
                except Exception:
                    logger.exception("event=wal_on_sync_failed")
        self._inflight = []

    async def _in_io(self, fn: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    # --- fail-stop --------------------------------------------------------------------

    def _fatal_error(self) -> WalFatalError:
        """A fresh exception per waiter (one shared instance would collect tracebacks)."""
        assert self._fatal is not None
        err = WalFatalError(str(self._fatal))
        err.__cause__ = self._fatal.__cause__
        return err

    def _fail(self, exc: BaseException, notify: bool) -> None:
        first = self._fatal is None
        if first:
            if isinstance(exc, WalFatalError):
                self._fatal = exc
            else:
                self._fatal = WalFatalError(f"wal: writer failed, the log is stopped: {exc!r}")
                self._fatal.__cause__ = exc
            logger.log(logging.ERROR if notify else logging.WARNING, "%s", self._fatal)
        waiters = [*self._inflight, *self._queue]
        self._written = []  # never durable as far as anyone will hear
        self._inflight = []
        self._queue.clear()
        for p in waiters:
            if not p.future.done():
                p.future.set_exception(self._fatal_error())
        if first and notify and self._on_fatal is not None:
            try:
                self._on_fatal(self._fatal or exc)
            except Exception:
                logger.exception("event=wal_on_fatal_failed")
