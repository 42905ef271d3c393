"""The store: group commit really batches, a failing job rolls back only itself, and
nothing blocks the event loop."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from accord.participants import Store, StoreError


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path / "s.db")
    await s.open(lambda c: c.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)"))
    yield s
    await s.close()


async def test_pragmas(store: Store) -> None:
    def q(c: sqlite3.Connection) -> tuple[str, int]:
        return c.execute("PRAGMA journal_mode").fetchone()[0], c.execute(
            "PRAGMA synchronous"
        ).fetchone()[0]

    assert await store.read(q) == ("wal", 2)  # 2 = FULL


async def test_group_commit_batches_concurrent_writes(store: Store) -> None:
    n = 300

    def insert(k: int) -> Callable[[sqlite3.Connection], int]:
        def job(c: sqlite3.Connection) -> int:
            c.execute("INSERT INTO t VALUES (?, ?)", (k, "x"))
            return k

        return job

    results = await asyncio.gather(*(store.write(insert(k)) for k in range(n)))
    assert results == list(range(n))
    assert store.stats.jobs == n
    # Many callers per COMMIT (one fsync each): far fewer commits than writes.
    assert store.stats.commits < n / 4, store.stats
    assert store.stats.max_batch > 1
    assert await store.read(lambda c: c.execute("SELECT COUNT(*) FROM t").fetchone()[0]) == n


async def test_failing_job_rolls_back_only_its_savepoint(store: Store) -> None:
    def ok(k: int) -> Callable[[sqlite3.Connection], int]:
        return lambda c: c.execute("INSERT INTO t VALUES (?, 'ok')", (k,)).rowcount

    def bad(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO t VALUES (100, 'bad')")
        raise ValueError("handler failed")

    results = await asyncio.gather(
        store.write(ok(1)),
        store.write(bad),
        store.write(ok(2)),
        return_exceptions=True,
    )
    assert results[0] == 1 and results[2] == 1
    assert isinstance(results[1], ValueError)
    rows = await store.read(lambda c: c.execute("SELECT k FROM t ORDER BY k").fetchall())
    assert rows == [(1,), (2,)]


async def test_constraint_error_in_a_job_is_isolated(store: Store) -> None:
    await store.write(lambda c: c.execute("INSERT INTO t VALUES (1, 'a')").rowcount)
    dup = store.write(lambda c: c.execute("INSERT INTO t VALUES (1, 'dup')").rowcount)
    fine = store.write(lambda c: c.execute("INSERT INTO t VALUES (2, 'b')").rowcount)
    results = await asyncio.gather(dup, fine, return_exceptions=True)
    assert isinstance(results[0], sqlite3.IntegrityError) and results[1] == 1


async def test_jobs_run_off_the_event_loop(store: Store) -> None:
    loop_thread = threading.get_ident()
    write_thread = await store.write(lambda c: threading.get_ident())
    read_thread = await store.read(lambda c: threading.get_ident())
    assert loop_thread not in (write_thread, read_thread)


async def test_cancelled_caller_does_not_cancel_the_write(store: Store) -> None:
    gate = threading.Event()

    def slow(c: sqlite3.Connection) -> None:
        gate.wait(5)
        c.execute("INSERT INTO t VALUES (7, 'late')")

    task = asyncio.create_task(store.write(slow))
    await asyncio.sleep(0.05)
    task.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.write(lambda c: None)  # the next batch: the first one has committed
    assert await store.read(lambda c: c.execute("SELECT v FROM t WHERE k = 7").fetchone()) == (
        "late",
    )


async def test_closed_store_refuses_writes(tmp_path: Path) -> None:
    s = Store(tmp_path / "c.db")
    await s.open()
    await s.close()
    await s.close()  # twice is fine
    with pytest.raises(StoreError):
        await s.write(lambda c: None)


def _returns(k: int) -> Callable[[sqlite3.Connection], int]:
    return lambda c: k


def _inserts(k: int) -> Callable[[sqlite3.Connection], int]:
    return lambda c: c.execute("INSERT INTO t VALUES (?)", (k,)).rowcount


async def test_writes_of_one_loop_iteration_are_one_batch(store: Store) -> None:
    # The writer is handed every job queued in one event-loop iteration at once, so
    # callers that started together share one COMMIT (and one wake-up of the writer).
    commits, jobs = store.stats.commits, store.stats.jobs
    n = 40
    results = await asyncio.gather(*(store.write(_returns(k)) for k in range(n)))
    assert results == list(range(n))
    assert (store.stats.jobs - jobs, store.stats.commits - commits) == (n, 1)


async def test_batches_are_capped_at_max_batch(tmp_path: Path) -> None:
    s = Store(tmp_path / "m.db", max_batch=8)
    await s.open(lambda c: c.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)"))
    try:
        n = 20
        inserted = await asyncio.gather(*(s.write(_inserts(k)) for k in range(n)))
        assert inserted == [1] * n
        assert s.stats.max_batch == 8 and s.stats.commits == 3, s.stats
    finally:
        await s.close()


async def test_close_runs_the_writes_of_the_current_iteration(tmp_path: Path) -> None:
    s = Store(tmp_path / "q.db")
    await s.open(lambda c: c.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)"))
    tasks = [asyncio.ensure_future(s.write(_inserts(k))) for k in range(5)]
    await asyncio.sleep(0)  # the writes are queued in this iteration, not yet handed over
    await s.close()
    await asyncio.gather(*tasks)
    assert s.stats.jobs == 5
