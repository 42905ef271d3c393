"""The participant's SQLite database, and the one thread that writes it.

Blocking SQLite work never runs on the event loop. The event loop hands the jobs of one
loop iteration to the writer together (one queue item, one wake-up of the writer, after
the iteration's handlers queued theirs). One writer thread owns the write
connection and does group commit: it takes every job waiting in its queue (up to
``max_batch``), runs each in its own SAVEPOINT inside one transaction (a job that raises
rolls back only its savepoint), COMMITs once (one fsync for the whole batch: WAL mode,
``synchronous=FULL``), and only then answers every caller, with one
``loop.call_soon_threadsafe`` per batch. A caller is never answered before its change is
durable.

The writer thread also keeps :attr:`Store.cache`, a memo of committed rows for code that
runs on it (the barrier keeps the fence epochs there). The store clears it whenever it can
no longer vouch for it: a batch rolled back as a whole, or another connection changed the
file (``PRAGMA data_version``, checked at the start of every batch).

Reads run on a second thread with its own connection (WAL readers do not block the
writer) and see only committed data.

A failed COMMIT is fatal (fail-stop): the batch's callers get :class:`StoreError` and so
does every later write, because after a failed fsync nobody knows what is on disk.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")

log = logging.getLogger("accord.participant.store")

#: A slow COMMIT (fsync) is worth a warning.
SLOW_COMMIT_S = 0.5


class StoreError(RuntimeError):
    """participants: the store cannot make changes durable (or is closed)."""


@dataclass
class StoreStats:
    """Counters of the writer thread (read them from any thread; they only grow)."""

    jobs: int = 0
    commits: int = 0
    max_batch: int = 0
    commit_seconds: float = 0.0


#: A queued write: the function and the future of its caller.
_Job = tuple[Callable[[sqlite3.Connection], Any], "asyncio.Future[Any]"]
_Answer = tuple["asyncio.Future[Any]", Any, BaseException | None]


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection configured like every connection of the store."""
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=30.0, cached_statements=256
    )
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: the WAL is fsynced at every COMMIT, so an answered change survives power loss.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    # Durability-neutral tuning: a bigger page cache (16 MiB), per-job savepoint journals
    # kept in memory, and fewer (larger) checkpoints; the WAL file is truncated back to
    # 64 MiB after a checkpoint.
    conn.execute("PRAGMA cache_size=-16384")
    conn.execute("PRAGMA temp_store=MEMORY")
    conn.execute("PRAGMA wal_autocheckpoint=4000")
    conn.execute("PRAGMA journal_size_limit=67108864")
    if readonly:
        conn.execute("PRAGMA query_only=ON")
    return conn


class Store:
    """The SQLite file of one participant. Use :meth:`write` and :meth:`read` from the
    event loop; the functions they are given run on the store's threads."""

    def __init__(self, path: Path | str, *, max_batch: int = 256) -> None:
        self.path = Path(path)
        self.max_batch = max_batch
        self.stats = StoreStats()
        # Jobs in lists (one per event-loop iteration); None is the stop sentinel.
        self._queue: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        #: Jobs queued in this event-loop iteration (event loop only).
        self._pending: list[_Job] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._broken: BaseException | None = None
        self._closed = False
        #: Writer-thread memo of committed rows (see the module docstring): read and
        #: write it only from functions given to :meth:`write`.
        self.cache: dict[Any, Any] = {}
        self._data_version: int | None = None

    async def open(self, setup: Callable[[sqlite3.Connection], object] | None = None) -> None:
        """Opens (creating) the database and starts the threads; ``setup`` runs first, on
        the writer thread, in autocommit mode (schema creation)."""
        self._loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._writer, args=(setup, ready), name=f"accord-writer:{self.path.name}"
        )
        self._thread.daemon = True
        self._thread.start()
        await ready
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="accord-reader")
        self._read_conn = await self._loop.run_in_executor(
            self._reader, lambda: connect(self.path, readonly=True)
        )

    async def write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Runs ``fn`` in its own savepoint of the next group commit; returns its result
        once durable. If ``fn`` raises, its changes are rolled back and the exception is
        raised here (after the batch committed). ``fn`` may call :func:`undo_job` to
        discard its own changes so far and go on."""
        if self._broken is not None:
            raise StoreError(f"participants: store failed: {self._broken}")
        if self._closed or self._loop is None:
            raise StoreError("participants: store is closed")
        future: asyncio.Future[_T] = self._loop.create_future()
        # Handed over once per event-loop iteration, not per call: the writer is woken
        # once, after this iteration's other handlers queued theirs, instead of waking at
        # the first one and then contending for the GIL while they run.
        pending = self._pending
        pending.append((fn, future))
        if len(pending) == 1:
            self._loop.call_soon(self._hand_over)
        # A cancelled caller does not cancel the job: the writer runs every queued job
        # whatever became of its future, commits, and drops the answer of a cancelled one
        # (no shield needed). The barrier makes the coordinator's retry see the recorded
        # result.
        return await future

    def _hand_over(self) -> None:
        if self._pending:
            jobs, self._pending = self._pending, []
            self._queue.put(jobs)

    async def read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Runs ``fn`` on the reader thread (committed data only)."""
        if self._reader is None or self._read_conn is None or self._loop is None:
            raise StoreError("participants: store is closed")
        conn = self._read_conn
        return await self._loop.run_in_executor(self._reader, _read_txn, conn, fn)

    async def close(self) -> None:
        """Finishes the queued jobs, then stops the threads. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is not None:
            self._hand_over()  # jobs of this iteration run before the stop sentinel
            self._queue.put(None)
            await asyncio.to_thread(thread.join)
        if self._reader is not None:
            reader, conn = self._reader, self._read_conn
            self._reader, self._read_conn = None, None
            if conn is not None:
                await asyncio.get_running_loop().run_in_executor(reader, conn.close)
            reader.shutdown(wait=True)

    # -- writer thread ------------------------------------------------------------------

    def _writer(
        self, setup: Callable[[sqlite3.Connection], object] | None, ready: asyncio.Future[None]
    ) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = connect(self.path)
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle, ready, None, exc)
            return
        try:
            if setup is not None:
                # Autocommit mode, so setup may use executescript (which COMMITs first);
                # schema statements are idempotent (IF NOT EXISTS) anyway.
                setup(conn)
                if conn.in_transaction:
                    conn.execute("COMMIT")
        except BaseException as exc:
            conn.close()
            loop.call_soon_threadsafe(_settle, ready, None, exc)
            return
        loop.call_soon_threadsafe(_settle, ready, None, None)
        try:
            self._run(conn, loop)
        finally:
            conn.close()

    def _run(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        stopping = False
        jobs: list[_Job] = []
        while jobs or not stopping:
            if not jobs:
                item = self._queue.get()
                if item is None:
                    return
                jobs = item
            while len(jobs) < self.max_batch and not stopping:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                else:
                    jobs += item
            batch, jobs = jobs[: self.max_batch], jobs[self.max_batch :]
            try:
                answers = self._commit_batch(conn, batch)
            except BaseException as exc:  # BEGIN or SAVEPOINT failed (e.g. locked)
                log.error("event=batch_failed path=%s error=%r", self.path, exc)
                self.cache.clear()
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                err = StoreError(f"participants: batch failed: {exc}")
                answers = [(future, None, err) for _, future in batch]
            # One wake-up of the event loop per batch.
            loop.call_soon_threadsafe(_deliver, answers)

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> list[_Answer]:
        if self._broken is not None:
            err = StoreError(f"participants: store failed: {self._broken}")
            return [(future, None, err) for _, future in batch]
        answers: list[_Answer] = []
        append = answers.append
        execute = conn.execute
        execute("BEGIN IMMEDIATE")
        # The write lock is held: nobody else can change the file until COMMIT.
        version = execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self.cache.clear()
            self._data_version = version
        for fn, future in batch:
            execute("SAVEPOINT accord_job")
            try:
                value = fn(conn)
            except BaseException as exc:
                if conn.in_transaction:
                    execute("ROLLBACK TO accord_job")
                    execute("RELEASE accord_job")
                    append((future, None, exc))
                    continue
                # SQLite rolled back the whole transaction (e.g. disk full): the batch's
                # earlier jobs are lost too. Nobody has been answered yet, so fail them
                # all (they are retried), and go on in a fresh transaction.
                self.cache.clear()
                lost = StoreError(f"participants: transaction rolled back by SQLite: {exc}")
                answers = [(f, None, lost if e is None else e) for f, _, e in answers]
                append = answers.append
                append((future, None, exc))
                execute("BEGIN IMMEDIATE")
                continue
            execute("RELEASE accord_job")
            append((future, value, None))
        started = time.monotonic()
        try:
            execute("COMMIT")
        except BaseException as exc:
            self._broken = exc
            self.cache.clear()
            log.critical("event=commit_failed path=%s error=%r (fail-stop)", self.path, exc)
            err = StoreError(f"participants: commit failed: {exc}")
            return [(future, None, err) for _, future in batch]
        elapsed = time.monotonic() - started
        if elapsed > SLOW_COMMIT_S:
            log.warning("event=slow_commit seconds=%.3f batch=%d", elapsed, len(batch))
        stats = self.stats
        stats.jobs += len(batch)
        stats.commits += 1
        stats.commit_seconds += elapsed
        stats.max_batch = max(stats.max_batch, len(batch))
        return answers


def undo_job(conn: sqlite3.Connection) -> None:
    """Discards the calling job's changes so far; the job goes on (in its savepoint)
    and may write again. For use inside a function given to :meth:`Store.write`."""
    conn.execute("ROLLBACK TO accord_job")


def _read_txn(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], _T]) -> _T:
    # One read transaction, so fn sees one consistent snapshot.
    conn.execute("BEGIN")
    try:
        return fn(conn)
    finally:
        conn.execute("COMMIT")


def _settle(future: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(value)
    else:
        future.set_exception(exc)


def _deliver(answers: list[_Answer]) -> None:
    # On the event loop. A cancelled caller's future is done already: its answer is
    # dropped (and an exception is never set on it, so none goes unretrieved).
    for future, value, exc in answers:
        if future.done():
            continue
        if exc is None:
            future.set_result(value)
        else:
            future.set_exception(exc)
