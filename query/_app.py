"""The read model at run time: the store, one follower per shard, the change stream,
health, metrics and rebuilds. :class:`QueryApp` is the :class:`QueryBackend` the gRPC
servicer and the web console use.

Rebuild (``accord query rebuild``): a second store is filled from LSN 0 of every shard
(a checkpointed log answers with a snapshot first) by followers of its own, while the
current store keeps serving and keeps being fed. Once every rebuild follower has caught
up with the durable LSN it first heard of (or its feed has been idle for a second: the
live edge), the live followers stop, reads are held for the moment of the swap, and the
new store replaces the old: for SQLite both files are closed and the new file is
renamed over the old one (``os.replace``, atomic; the old file's ``-wal``/``-shm`` are
gone once its last connection closed); for PostgreSQL the new schema is renamed over
the old one in one transaction. Then the store is reopened and the live followers
resume from its positions (so nothing applied to the old store after the rebuild's
target is lost: it is fetched again from the feed).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation

import accord.v1 as pb
from accord.common.telemetry import Telemetry
from accord.common.transport import TransportSettings
from accord.query import _read
from accord.query._backend import Health, ShardHealth
from accord.query._follow import FeedState, Follower, parse_coordinator
from accord.query._store import PostgresStore, SqliteStore, Store, open_store, remove_sqlite

log = logging.getLogger("accord.query")

#: /healthz answers 503 when a shard is further behind than this (events).
DEFAULT_MAX_LAG_EVENTS = 1000
#: A rebuild gives up after this long.
REBUILD_TIMEOUT_S = 600.0


def _now_ms() -> int:
    return int(time.time() * 1000)


class StoreLockedError(RuntimeError):
    pass


class StoreLock:
    """An advisory lock on ``<file>.lock`` beside a SQLite store: one service (or one
    offline rebuild) per file, since a rebuild renames a new file over it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(f"{path}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(
                f"{self.path}: another query service (or rebuild) is using this store"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _Changes:
    """One subscriber of :meth:`QueryApp.changes`."""

    def __init__(self, buffer: int) -> None:
        self.buffer = buffer
        self.queue: deque[pb.TransactionSummary] = deque()
        self.wake = asyncio.Event()
        self.dropped = False


def rebuild_store(store: Store) -> Store:
    """The store a rebuild of ``store`` fills (beside it)."""
    if isinstance(store, SqliteStore):
        return SqliteStore(Path(f"{store.path}.rebuild"))
    assert isinstance(store, PostgresStore)
    return PostgresStore(store.url, schema=f"{store.schema}_rebuild")


async def _discard(store: Store) -> None:
    if isinstance(store, SqliteStore):
        remove_sqlite(store.path)
    elif isinstance(store, PostgresStore):
        await store.drop()


async def fill(
    store: Store,
    targets: Sequence[tuple[str, str]],
    *,
    transport: TransportSettings | None = None,
    timeout_s: float = REBUILD_TIMEOUT_S,
    idle_s: float = 1.0,
) -> dict[str, int]:
    """Follows each (shard or "", address) into ``store`` until caught up with the
    durable LSN first heard of (or idle for ``idle_s`` at the live edge); returns each
    shard's applied LSN."""
    now = _now_ms

    async def apply(shard: str, events: Sequence[pb.FeedEvent]) -> int:
        return (await store.apply(shard, events, now_ms=now())).position

    async def start_lsn(shard: str) -> int:
        pos = (await store.positions()).get(shard)
        return pos.applied_lsn if pos else 0

    followers = [
        Follower(
            FeedState(shard=shard, address=address),
            apply=apply,
            start_lsn=start_lsn,
            transport=transport,
        )
        for shard, address in targets
    ]
    first_durable: dict[int, int] = {}
    for f in followers:
        f.start()
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                done = True
                for i, f in enumerate(followers):
                    st = f.state
                    if not st.connected:
                        done = False
                        continue
                    target = first_durable.setdefault(i, st.durable_lsn)
                    idle = time.monotonic() - st.heard >= idle_s
                    if st.applied_lsn < target and not idle:
                        done = False
                if done:
                    break
                await asyncio.sleep(0.1)
    finally:
        for f in followers:
            await f.stop()
    return {f.state.shard: f.state.applied_lsn for f in followers}


class QueryApp:
    """The read model: ``await app.start()`` opens the store and follows the shards
    given by :meth:`set_owners` (or the static ``coordinators``)."""

    def __init__(
        self,
        store: Store,
        *,
        coordinators: Sequence[str] = (),
        transport: TransportSettings | None = None,
        telemetry: Telemetry | None = None,
        max_lag_events: int = DEFAULT_MAX_LAG_EVENTS,
        lock: bool = True,
    ) -> None:
        self.store = store
        self._static = [parse_coordinator(c) for c in coordinators]
        self._transport = transport
        self.max_lag_events = max_lag_events
        self._followers: list[Follower] = []
        self._subs: set[_Changes] = set()
        self._reads = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()
        self._lock = StoreLock(store.path) if lock and isinstance(store, SqliteStore) else None
        self._rebuilding: asyncio.Lock = asyncio.Lock()
        self.rebuilds = 0
        t = telemetry or Telemetry.disabled()
        m = t.meter
        m.create_observable_gauge(
            "accord.query.lag.events",
            callbacks=[self._observe_lag_events],
            description="events of the shard's durable log not applied to the read model yet",
        )
        m.create_observable_gauge(
            "accord.query.lag.seconds",
            callbacks=[self._observe_lag_seconds],
            description="age of the oldest event of the shard received but not applied yet",
        )
        self._applied = m.create_counter(
            "accord.query.events.applied", description="feed events applied, by shard"
        )

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        if self._lock is not None:
            self._lock.acquire()
        try:
            await self.store.open()
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise
        self._open.set()
        for shard, address in self._static:
            self._add(shard, address)

    async def stop(self) -> None:
        for f in self._followers:
            await f.stop()
        self._followers = []
        for sub in self._subs:
            sub.dropped = True
            sub.wake.set()
        if self._open.is_set():
            self._open.clear()
            await self.store.close()
        if self._lock is not None:
            self._lock.release()

    def _add(self, shard: str, address: str) -> Follower:
        f = Follower(
            FeedState(shard=shard, address=address),
            apply=self._apply,
            start_lsn=self._start_lsn,
            transport=self._transport,
        )
        self._followers.append(f)
        f.start()
        return f

    def set_owners(self, owners: Mapping[str, str], known: Sequence[str] | None = None) -> None:
        """Shard -> owner address now (from etcd). Shards not in ``owners`` but in
        ``known`` wait without an owner; shards in neither stop being followed."""
        by_shard = {f.state.shard: f for f in self._followers}
        for shard, address in owners.items():
            f = by_shard.get(shard)
            if f is None:
                log.info("event=shard_found shard=%s owner=%s", shard, address)
                self._add(shard, address)
            else:
                f.move(address)
        for shard, f in by_shard.items():
            if shard in owners:
                continue
            if known is not None and shard not in known:
                log.info("event=shard_gone shard=%s (no longer known to etcd)", shard)
                self._followers.remove(f)
                asyncio.get_running_loop().create_task(f.stop())
            else:
                f.move("")

    @property
    def feeds(self) -> Sequence[FeedState]:
        return [f.state for f in self._followers]

    async def _start_lsn(self, shard: str) -> int:
        await self._open.wait()
        pos = (await self.store.positions()).get(shard)
        return pos.applied_lsn if pos else 0

    async def _apply(self, shard: str, events: Sequence[pb.FeedEvent]) -> int:
        await self._open.wait()
        done = await self.store.apply(shard, events, now_ms=_now_ms())
        if done.applied:
            self._applied.add(done.applied, {"shard": shard})
        if done.rows and self._subs:
            self._publish([r.summary() for r in done.rows])
        return done.position

    def _publish(self, summaries: list[pb.TransactionSummary]) -> None:
        for sub in self._subs:
            if sub.dropped:
                continue
            if len(sub.queue) + len(summaries) > sub.buffer:
                sub.dropped = True
            else:
                sub.queue.extend(summaries)
            sub.wake.set()

    # ------------------------------------------------------------------ reads

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[Store]:
        await self._open.wait()
        self._reads += 1
        self._idle.clear()
        try:
            yield self.store
        finally:
            self._reads -= 1
            if self._reads == 0:
                self._idle.set()

    async def list(self, req: pb.QueryListRequest) -> pb.QueryListResponse:
        async with self._reading() as store:
            return await _read.list_transactions(store, req)

    async def get(self, gid: str) -> pb.TransactionView:
        async with self._reading() as store:
            return await _read.get_transaction(store, gid)

    async def stats(self, req: pb.StatsRequest) -> pb.StatsResponse:
        async with self._reading() as store:
            out = await _read.stats(store, req)
        now = _now_ms()
        out.shards.extend(f.state.shard_lag(now) for f in self._followers if f.state.shard)
        return out

    async def changes(self, *, buffer: int = 1024) -> AsyncIterator[pb.TransactionSummary]:
        sub = _Changes(buffer)
        self._subs.add(sub)
        try:
            while True:
                while sub.queue:
                    yield sub.queue.popleft()
                if sub.dropped:
                    return
                sub.wake.clear()
                await sub.wake.wait()
        finally:
            self._subs.discard(sub)

    def health(self) -> Health:
        now = _now_ms()
        shards = []
        reasons = []
        for f in self._followers:
            st = f.state
            lag = st.shard_lag(now)
            shards.append(
                ShardHealth(
                    shard=st.shard or f"?{st.address}",
                    coordinator=st.address,
                    connected=st.connected,
                    applied_lsn=st.applied_lsn,
                    durable_lsn=st.durable_lsn,
                    lag_events=st.lag_events,
                    lag_seconds=lag.lag_seconds,
                )
            )
            name = st.shard or st.address
            if not st.connected:
                reasons.append(
                    f"shard {name}: not connected"
                    + (f" ({st.last_error})" if st.last_error else "")
                )
            elif st.lag_events > self.max_lag_events:
                reasons.append(
                    f"shard {name}: {st.lag_events} events behind (limit {self.max_lag_events})"
                )
        if not self._open.is_set():
            reasons.append("the store is not open")
        return Health(
            healthy=not reasons,
            shards=tuple(shards),
            max_lag_events=self.max_lag_events,
            reasons=tuple(reasons),
        )

    def coordinator_for(self, shard: str) -> str:
        for f in self._followers:
            if f.state.shard == shard:
                return f.state.address
        return ""

    # ------------------------------------------------------------------ metrics

    def _observe_lag_events(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(f.state.lag_events, {"shard": f.state.shard})
            for f in self._followers
            if f.state.shard
        ]

    def _observe_lag_seconds(self, options: CallbackOptions) -> Iterable[Observation]:
        now = _now_ms()
        return [
            Observation(f.state.lag_seconds(now), {"shard": f.state.shard})
            for f in self._followers
            if f.state.shard
        ]

    # ------------------------------------------------------------------ rebuild

    async def rebuild(self, *, timeout_s: float = REBUILD_TIMEOUT_S) -> dict[str, Any]:
        """Rebuilds the read model from scratch beside the serving one, then swaps."""
        if self._rebuilding.locked():
            raise RuntimeError("a rebuild is already running")
        async with self._rebuilding:
            started = time.monotonic()
            new = rebuild_store(self.store)
            await _discard(new)
            await new.open()
            targets = [(f.state.shard, f.state.address) for f in self._followers]
            log.info("event=rebuild_started shards=%d into=%s", len(targets), _where(new))
            try:
                positions = await fill(new, targets, transport=self._transport, timeout_s=timeout_s)
                count = await new.count()
            except BaseException:
                await new.close()
                await _discard(new)
                raise
            # The swap: feeds paused, reads held for its moment.
            addresses = [(f.state.shard, f.state.address) for f in self._followers]
            for f in self._followers:
                await f.stop()
            self._followers = []
            self._open.clear()
            await self._idle.wait()
            old = self.store
            if isinstance(new, SqliteStore):
                await new.checkpoint()
            await new.close()
            await old.close()
            fresh: Store
            if isinstance(old, SqliteStore) and isinstance(new, SqliteStore):
                remove_sqlite(Path(f"{old.path}"))
                os.replace(new.path, old.path)
                remove_sqlite(new.path)
                fresh = SqliteStore(old.path)
            else:
                assert isinstance(old, PostgresStore) and isinstance(new, PostgresStore)
                await old.swap_in(new)
                fresh = PostgresStore(old.url, schema=old.schema)
            self.store = fresh
            await fresh.open()
            self._open.set()
            for shard, address in addresses:
                self._add(shard, address)
            self.rebuilds += 1
            took = time.monotonic() - started
            log.info("event=rebuild_done transactions=%d seconds=%.2f", count, took)
            return {
                "transactions": count,
                "shards": positions,
                "seconds": round(took, 3),
                "store": _where(fresh),
            }


def _where(store: Store) -> str:
    if isinstance(store, PostgresStore):
        return f"schema {store.schema}"
    return store.url


async def rebuild_offline(
    db: str,
    targets: Sequence[tuple[str, str]],
    *,
    transport: TransportSettings | None = None,
    timeout_s: float = REBUILD_TIMEOUT_S,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``accord query rebuild --db`` with no service running on the store: fill a new
    store beside it from LSN 0, then swap it in (a SQLite file renamed over the old
    one; a PostgreSQL schema renamed over the old one)."""
    store = open_store(db)
    lock = StoreLock(store.path) if isinstance(store, SqliteStore) else None
    if lock is not None:
        lock.acquire()
    try:
        started = time.monotonic()
        new = rebuild_store(store)
        await _discard(new)
        await new.open()
        try:
            positions = await fill(new, targets, transport=transport, timeout_s=timeout_s)
            count = await new.count()
            if isinstance(new, SqliteStore):
                await new.checkpoint()
        finally:
            await new.close()
        if isinstance(store, SqliteStore) and isinstance(new, SqliteStore):
            remove_sqlite(store.path)
            os.replace(new.path, store.path)
            remove_sqlite(new.path)
        else:
            assert isinstance(store, PostgresStore) and isinstance(new, PostgresStore)
            await store.swap_in(new)
        if progress is not None:
            progress(f"rebuilt {count} transactions")
        return {
            "transactions": count,
            "shards": positions,
            "seconds": round(time.monotonic() - started, 3),
            "store": db,
        }
    finally:
        if lock is not None:
            lock.release()
