"""The read model's store: SQLite (a file in WAL mode, the default) or PostgreSQL
(``postgresql://...``, psycopg 3 async), one schema for both.

Tables::

    transactions     gid PK, shard, protocol, state, idempotency_key, created_ms,
                     ended_ms (0 while unfinished), duration_ms, reason, trace_id,
                     last_lsn, branches, attempts, services (comma-joined, for display),
                     txn (the current accord.v1.Transaction, protobuf bytes)
    txn_services     (gid, service) PK: the service filter
    events           (gid, lsn) PK: the timeline (kind, state, branch, branch_state,
                     attempts, compensation_attempts, error, service, unix_ms)
    shard_positions  shard PK -> applied_lsn (the last LSN applied), applied_unix_ms
    meta             key -> value (schema version, the cursor-signing key)

Indexes serve every TransactionFilter field and every QueryOrder: (created_ms, gid),
(ended_ms, gid), (duration_ms, gid), (state, created_ms), (protocol, created_ms),
(shard, created_ms), (idempotency_key), (service, gid) on txn_services; gid prefixes use
the primary key (a range scan; PostgreSQL columns are ``COLLATE "C"`` so byte order is
text order). Stats are computed from ``transactions`` (GROUP BY minute), not kept.

Exactly-once projection: :meth:`Store.apply` applies a batch of one shard's events and
moves that shard's applied LSN in ONE store transaction. An event at or below the
stored LSN is skipped, so a feed resumed from the stored LSN after a crash (which may
send events again) never applies one twice and never misses one. SNAPSHOT events upsert
whole transactions without moving the LSN (they share the snapshot's LSN);
SNAPSHOT_END moves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sqlite3
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import accord.v1 as pb
from accord.query._project import TxnRow, project

SCHEMA_VERSION = "1"
K = pb.FeedEventKind

_TXN_COLS = (
    "gid, shard, protocol, state, idempotency_key, created_ms, ended_ms, duration_ms, "
    "reason, trace_id, last_lsn, branches, attempts, services, txn"
)
_ROW_COLS = "gid, shard, trace_id, ended_ms, last_lsn, txn"
_EVENT_COLS = (
    "gid, lsn, unix_ms, kind, state, branch, branch_state, attempts, "
    "compensation_attempts, error, service"
)


def _schema(text: str, blob: str) -> list[str]:
    return [
        f"""CREATE TABLE IF NOT EXISTS transactions (
            gid {text} PRIMARY KEY, shard {text} NOT NULL, protocol INTEGER NOT NULL,
            state INTEGER NOT NULL, idempotency_key {text} NOT NULL,
            created_ms BIGINT NOT NULL, ended_ms BIGINT NOT NULL, duration_ms BIGINT NOT NULL,
            reason TEXT NOT NULL, trace_id TEXT NOT NULL, last_lsn BIGINT NOT NULL,
            branches INTEGER NOT NULL, attempts INTEGER NOT NULL, services TEXT NOT NULL,
            txn {blob} NOT NULL)""",
        f"""CREATE TABLE IF NOT EXISTS txn_services (
            gid {text} NOT NULL, service {text} NOT NULL, PRIMARY KEY (gid, service))""",
        f"""CREATE TABLE IF NOT EXISTS events (
            gid {text} NOT NULL, lsn BIGINT NOT NULL, unix_ms BIGINT NOT NULL,
            kind INTEGER NOT NULL, state INTEGER NOT NULL, branch TEXT NOT NULL,
            branch_state INTEGER NOT NULL, attempts INTEGER NOT NULL,
            compensation_attempts INTEGER NOT NULL, error TEXT NOT NULL,
            service TEXT NOT NULL, PRIMARY KEY (gid, lsn))""",
        f"""CREATE TABLE IF NOT EXISTS shard_positions (
            shard {text} PRIMARY KEY, applied_lsn BIGINT NOT NULL,
            applied_unix_ms BIGINT NOT NULL)""",
        "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS txn_created ON transactions (created_ms, gid)",
        "CREATE INDEX IF NOT EXISTS txn_ended ON transactions (ended_ms, gid)",
        "CREATE INDEX IF NOT EXISTS txn_duration ON transactions (duration_ms, gid)",
        "CREATE INDEX IF NOT EXISTS txn_state ON transactions (state, created_ms)",
        "CREATE INDEX IF NOT EXISTS txn_protocol ON transactions (protocol, created_ms)",
        "CREATE INDEX IF NOT EXISTS txn_shard ON transactions (shard, created_ms)",
        "CREATE INDEX IF NOT EXISTS txn_key ON transactions (idempotency_key)",
        "CREATE INDEX IF NOT EXISTS svc_service ON txn_services (service, gid)",
    ]


@dataclass(frozen=True, kw_only=True)
class Position:
    shard: str
    applied_lsn: int
    applied_unix_ms: int = 0


@dataclass(kw_only=True)
class Applied:
    """What one :meth:`Store.apply` did."""

    applied: int = 0  # events that changed a row
    skipped: int = 0  # at or below the stored LSN (or the row's)
    position: int = 0  # the shard's applied LSN afterwards
    rows: list[TxnRow] = field(default_factory=list)  # rows changed, last version each


@dataclass(frozen=True, kw_only=True)
class _Plan:
    position: int
    position_ms: int
    rows: list[TxnRow]
    services: list[tuple[str, str]]
    events: list[tuple[Any, ...]]
    applied: int
    skipped: int


def plan(
    applied_lsn: int,
    rows: dict[str, TxnRow],
    events: Sequence[pb.FeedEvent],
    shard: str,
    now_ms: int,
) -> _Plan:
    """The row changes of a batch (pure): ``rows`` holds the stored rows of the batch's
    gids and is updated in place."""
    position = applied_lsn
    position_ms = 0
    changed: dict[str, TxnRow] = {}
    services: list[tuple[str, str]] = []
    entries: list[tuple[Any, ...]] = []
    applied = skipped = 0
    for ev in events:
        if ev.lsn <= applied_lsn:
            skipped += 1
            continue
        if ev.kind == K.FEED_EVENT_KIND_SNAPSHOT_END:
            position = max(position, ev.lsn)
            position_ms = ev.unix_ms or position_ms
            continue
        if ev.kind != K.FEED_EVENT_KIND_SNAPSHOT:
            if ev.lsn <= position:
                skipped += 1  # out of order within the batch: never go backwards
                continue
            position = ev.lsn
            position_ms = ev.unix_ms or position_ms
        if not ev.shard:
            ev = _with_shard(ev, shard)
        out = project(ev, rows.get(ev.gid), now_ms=now_ms)
        if out is None:
            skipped += 1
            continue
        applied += 1
        rows[ev.gid] = changed[ev.gid] = out.row
        services.extend((ev.gid, s) for s in out.services)
        e = out.entry
        entries.append(
            (
                ev.gid,
                int(e.lsn),
                int(e.unix_ms),
                int(e.kind),
                int(e.state),
                e.branch,
                int(e.branch_state),
                int(e.attempts),
                int(e.compensation_attempts),
                e.error,
                e.service,
            )
        )
    return _Plan(
        position=position,
        position_ms=position_ms,
        rows=list(changed.values()),
        services=services,
        events=entries,
        applied=applied,
        skipped=skipped,
    )


def _with_shard(ev: pb.FeedEvent, shard: str) -> pb.FeedEvent:
    out = pb.FeedEvent()
    out.CopyFrom(ev)
    out.shard = shard
    return out


def _txn_params(r: TxnRow) -> tuple[Any, ...]:
    t = r.txn
    return (
        r.gid,
        r.shard,
        int(t.protocol),
        int(t.state),
        t.idempotency_key,
        int(t.created_unix_ms),
        r.ended_ms,
        r.duration_ms,
        t.reason,
        r.trace_id,
        r.last_lsn,
        r.branch_count,
        r.attempts,
        ",".join(r.services),
        t.SerializeToString(),
    )


def row_from(rec: Sequence[Any]) -> TxnRow:
    gid, shard, trace_id, ended_ms, last_lsn, blob = rec
    return TxnRow(
        gid=gid,
        shard=shard,
        trace_id=trace_id,
        ended_ms=int(ended_ms),
        last_lsn=int(last_lsn),
        txn=pb.Transaction.FromString(bytes(blob)),
    )


def entry_from(rec: Sequence[Any]) -> pb.TimelineEntry:
    (_gid, lsn, unix_ms, kind, state, branch, bstate, attempts, cattempts, error, service) = rec
    return pb.TimelineEntry(
        lsn=int(lsn),
        unix_ms=int(unix_ms),
        kind=int(kind),  # type: ignore[arg-type]
        state=int(state),  # type: ignore[arg-type]
        branch=branch,
        branch_state=int(bstate),  # type: ignore[arg-type]
        attempts=int(attempts),
        compensation_attempts=int(cattempts),
        error=error,
        service=service,
    )


class Store:
    """The interface both stores implement (``?`` placeholders in the SQL given to
    :meth:`fetch`; the PostgreSQL store translates them)."""

    url: str

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def positions(self) -> dict[str, Position]:
        rows = await self.fetch("SELECT shard, applied_lsn, applied_unix_ms FROM shard_positions")
        return {
            r[0]: Position(shard=r[0], applied_lsn=int(r[1]), applied_unix_ms=int(r[2]))
            for r in rows
        }

    async def apply(self, shard: str, events: Sequence[pb.FeedEvent], *, now_ms: int) -> Applied:
        """Applies one shard's batch and moves its applied LSN, in one transaction."""
        raise NotImplementedError

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A read-only query's rows."""
        raise NotImplementedError

    async def secret(self) -> bytes:
        """The store's own key for signing page tokens (made once, kept in ``meta``)."""
        raise NotImplementedError

    async def get(self, gid: str) -> tuple[TxnRow, list[pb.TimelineEntry]] | None:
        rows = await self.fetch(f"SELECT {_ROW_COLS} FROM transactions WHERE gid = ?", (gid,))
        if not rows:
            return None
        evs = await self.fetch(
            f"SELECT {_EVENT_COLS} FROM events WHERE gid = ? ORDER BY lsn", (gid,)
        )
        return row_from(rows[0]), [entry_from(e) for e in evs]

    async def count(self) -> int:
        rows = await self.fetch("SELECT COUNT(*) FROM transactions")
        return int(rows[0][0])


# ---------------------------------------------------------------- SQLite


class SqliteStore(Store):
    """A SQLite file in WAL mode. Writes run on one thread with one connection, reads on
    another with their own (WAL: readers never wait for the writer)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.url = str(self.path)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="query-store-w")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="query-store-r")
        self._w: sqlite3.Connection | None = None
        self._r: sqlite3.Connection | None = None
        self._secret = b""

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    async def _on(self, pool: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def _open_w(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        for stmt in _schema("TEXT", "BLOB"):
            conn.execute(stmt)
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        conn.execute(
            "INSERT OR IGNORE INTO meta VALUES ('cursor_key', ?)", (secrets.token_hex(16),)
        )
        self._secret = bytes.fromhex(
            conn.execute("SELECT v FROM meta WHERE k = 'cursor_key'").fetchone()[0]
        )
        conn.execute("COMMIT")
        self._w = conn

    def _open_r(self) -> None:
        self._r = self._connect()

    async def open(self) -> None:
        await self._on(self._writer, self._open_w)
        await self._on(self._reader, self._open_r)

    def _close_w(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None

    def _close_r(self) -> None:
        if self._r is not None:
            self._r.close()
            self._r = None

    async def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            await self._on(self._reader, self._close_r)
            await self._on(self._writer, self._close_w)
        self._reader.shutdown(wait=True)
        self._writer.shutdown(wait=True)

    async def secret(self) -> bytes:
        return self._secret

    def _fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        assert self._r is not None, "store not open"
        return list(self._r.execute(sql, tuple(params)).fetchall())

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await self._on(self._reader, self._fetch, sql, params)  # type: ignore[no-any-return]

    def _apply(self, shard: str, events: Sequence[pb.FeedEvent], now_ms: int) -> Applied:
        conn = self._w
        assert conn is not None, "store not open"
        conn.execute("BEGIN IMMEDIATE")
        try:
            got = conn.execute(
                "SELECT applied_lsn FROM shard_positions WHERE shard = ?", (shard,)
            ).fetchone()
            applied_lsn = int(got[0]) if got else 0
            rows = self._rows(conn, {e.gid for e in events if e.gid and e.lsn > applied_lsn})
            p = plan(applied_lsn, rows, events, shard, now_ms)
            _write(conn, p, shard, upsert=_SQLITE_UPSERT)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return Applied(applied=p.applied, skipped=p.skipped, position=p.position, rows=p.rows)

    @staticmethod
    def _rows(conn: sqlite3.Connection, gids: Iterable[str]) -> dict[str, TxnRow]:
        out: dict[str, TxnRow] = {}
        gl = list(gids)
        for i in range(0, len(gl), 500):
            chunk = gl[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for rec in conn.execute(
                f"SELECT {_ROW_COLS} FROM transactions WHERE gid IN ({marks})", chunk
            ):
                r = row_from(rec)
                out[r.gid] = r
        return out

    async def apply(self, shard: str, events: Sequence[pb.FeedEvent], *, now_ms: int) -> Applied:
        return await self._on(self._writer, self._apply, shard, list(events), now_ms)  # type: ignore[no-any-return]

    def _checkpoint(self) -> None:
        assert self._w is not None
        self._w.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def checkpoint(self) -> None:
        """Copies the WAL into the main file (before the file is moved by a rebuild)."""
        await self._on(self._writer, self._checkpoint)


_SQLITE_UPSERT = (
    f"INSERT INTO transactions ({_TXN_COLS}) VALUES ({','.join('?' * 15)}) "
    "ON CONFLICT (gid) DO UPDATE SET shard=excluded.shard, protocol=excluded.protocol, "
    "state=excluded.state, idempotency_key=excluded.idempotency_key, "
    "created_ms=excluded.created_ms, ended_ms=excluded.ended_ms, "
    "duration_ms=excluded.duration_ms, reason=excluded.reason, trace_id=excluded.trace_id, "
    "last_lsn=excluded.last_lsn, branches=excluded.branches, attempts=excluded.attempts, "
    "services=excluded.services, txn=excluded.txn"
)
_INSERT_SERVICE = "INSERT INTO txn_services (gid, service) VALUES (?, ?) ON CONFLICT DO NOTHING"
_INSERT_EVENT = (
    f"INSERT INTO events ({_EVENT_COLS}) VALUES ({','.join('?' * 11)}) ON CONFLICT DO NOTHING"
)
_UPSERT_POSITION = (
    "INSERT INTO shard_positions (shard, applied_lsn, applied_unix_ms) VALUES (?, ?, ?) "
    "ON CONFLICT (shard) DO UPDATE SET applied_lsn=excluded.applied_lsn, "
    "applied_unix_ms=excluded.applied_unix_ms"
)


def _write(conn: Any, p: _Plan, shard: str, *, upsert: str) -> None:
    if p.rows:
        conn.executemany(upsert, [_txn_params(r) for r in p.rows])
    if p.services:
        conn.executemany(_INSERT_SERVICE, p.services)
    if p.events:
        conn.executemany(_INSERT_EVENT, p.events)
    conn.execute(_UPSERT_POSITION, (shard, p.position, p.position_ms))


# ---------------------------------------------------------------- PostgreSQL


def _pg(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class PostgresStore(Store):
    """PostgreSQL through psycopg 3 async and a small pool; the tables live in their own
    schema (default ``accord_query``), so a rebuild can fill a second schema and swap
    the two by renaming in one transaction."""

    def __init__(self, url: str, *, schema: str = "accord_query", pool_size: int = 4) -> None:
        self.url = url
        self.schema = schema
        self.pool_size = pool_size
        self._pool: Any = None
        self._secret = b""

    async def open(self) -> None:
        import psycopg
        from psycopg_pool import AsyncConnectionPool

        schema = self.schema

        async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(f'SET search_path TO "{schema}"')
            await conn.commit()

        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(f'SET search_path TO "{schema}"')
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(2014)")
                for stmt in _schema('TEXT COLLATE "C"', "BYTEA"):
                    await conn.execute(stmt)
                await conn.execute(
                    "INSERT INTO meta VALUES ('schema', %s) ON CONFLICT DO NOTHING",
                    (SCHEMA_VERSION,),
                )
                await conn.execute(
                    "INSERT INTO meta VALUES ('cursor_key', %s) ON CONFLICT DO NOTHING",
                    (secrets.token_hex(16),),
                )
                cur = await conn.execute("SELECT v FROM meta WHERE k = 'cursor_key'")
                got = await cur.fetchone()
                assert got is not None
                self._secret = bytes.fromhex(got[0])
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            self.url, min_size=1, max_size=self.pool_size, configure=configure, open=False
        )
        await pool.open(wait=True, timeout=10.0)
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def secret(self) -> bytes:
        return self._secret

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        assert self._pool is not None, "store not open"
        async with self._pool.connection() as conn:
            cur = await conn.execute(_pg(sql), tuple(params))
            return list(await cur.fetchall())

    async def apply(self, shard: str, events: Sequence[pb.FeedEvent], *, now_ms: int) -> Applied:
        assert self._pool is not None, "store not open"
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO shard_positions VALUES (%s, 0, 0) ON CONFLICT DO NOTHING", (shard,)
            )
            cur = await conn.execute(
                "SELECT applied_lsn FROM shard_positions WHERE shard = %s FOR UPDATE", (shard,)
            )
            got = await cur.fetchone()
            applied_lsn = int(got[0]) if got else 0
            gids = list({e.gid for e in events if e.gid and e.lsn > applied_lsn})
            rows: dict[str, TxnRow] = {}
            if gids:
                cur = await conn.execute(
                    f"SELECT {_ROW_COLS} FROM transactions WHERE gid = ANY(%s)", (gids,)
                )
                for rec in await cur.fetchall():
                    r = row_from(rec)
                    rows[r.gid] = r
            p = plan(applied_lsn, rows, events, shard, now_ms)
            async with conn.cursor() as c:
                if p.rows:
                    await c.executemany(_pg(_SQLITE_UPSERT), [_txn_params(r) for r in p.rows])
                if p.services:
                    await c.executemany(_pg(_INSERT_SERVICE), p.services)
                if p.events:
                    await c.executemany(_pg(_INSERT_EVENT), p.events)
                await c.execute(_pg(_UPSERT_POSITION), (shard, p.position, p.position_ms))
        return Applied(applied=p.applied, skipped=p.skipped, position=p.position, rows=p.rows)

    async def swap_in(self, other: PostgresStore) -> None:
        """Makes ``other``'s schema this store's (the old one is dropped), in one
        transaction; both stores must be closed and reopened afterwards."""
        import psycopg

        async with await psycopg.AsyncConnection.connect(self.url) as conn, conn.transaction():
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            await conn.execute(f'ALTER SCHEMA "{other.schema}" RENAME TO "{self.schema}"')

    async def drop(self) -> None:
        import psycopg

        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')


def is_postgres(db: str) -> bool:
    return db.startswith(("postgresql://", "postgres://"))


def open_store(db: str, *, schema: str = "accord_query") -> Store:
    """A store for ``--db``: a ``postgresql://`` URL, or a SQLite file path."""
    if is_postgres(db):
        return PostgresStore(db, schema=schema)
    return SqliteStore(db)


def remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")
