"""A PostgreSQL bank's final state for the checker: the same :class:`ParticipantState`
the checker reads from a SQLite bank (accounts, ledger, branch rows, barrier rows, the
audit through :func:`accord.participants.read_audit`), read in one repeatable-read
snapshot, and saved as a SQLite file in the SQLite bank's layout so ``accord chaos
check --db NAME=FILE`` checks a PostgreSQL run offline exactly as a SQLite one.

A PostgreSQL bank holds no ``held`` column (a prepared transaction's row locks hold the
funds), so ``held`` is 0; a branch still prepared shows as a PREPARED branch row, which
the checker reports at quiescence."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

from accord.participants import AuditRow, read_audit
from accord.tools.chaos._final import (
    BranchRow,
    ParticipantState,
    StateError,
    read_bank_rows,
)


def load_postgres_participant(name: str, url: str) -> ParticipantState:
    """Reads a PostgreSQL bank participant's database (read-only)."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            conn.read_only = True
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            return _load(conn, name, url)
    except psycopg.Error as err:
        raise StateError(f"chaos: cannot read participant {name!r} at {url}: {err}") from err


def _columns(conn: Any, table: str) -> set[str]:
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = %s",
        (table,),
    ).fetchall()
    return {str(r[0]) for r in rows}


def _load(conn: Any, name: str, url: str) -> ParticipantState:
    for table in ("accounts", "ledger", "accord_branches", "accord_barrier"):
        if not _columns(conn, table):
            raise StateError(f"chaos: {url} ({name}) has no table {table!r}: not a bank database")
    held = "held" if "held" in _columns(conn, "accounts") else "0"
    rows = read_bank_rows(conn.execute, held=held)
    has_audit = bool(_columns(conn, "accord_audit"))
    return ParticipantState(
        name=name,
        path=url,
        accounts=rows.accounts,
        ledger=rows.ledger,
        branches=_with_prepared(conn, rows.branches),
        barrier=rows.barrier,
        audit=tuple(read_audit(url)) if has_audit else (),
        has_audit=has_audit,
    )


def _with_prepared(conn: Any, branches: tuple[BranchRow, ...]) -> tuple[BranchRow, ...]:
    """The branch rows, with every branch PostgreSQL still holds prepared (in
    ``pg_prepared_xacts``) as PREPARED whatever its row says: the checker reports it."""
    from accord.participants._pg import parse_transaction_name

    held: dict[tuple[str, str], float] = {}
    for name, at in conn.execute(
        "SELECT gid, extract(epoch FROM prepared) FROM pg_prepared_xacts"
        " WHERE database = current_database()"
    ):
        parsed = parse_transaction_name(str(name))
        if parsed is not None:
            held[(parsed[1], parsed[2])] = float(at)
    if not held:
        return branches
    out = []
    for b in branches:
        if held.pop((b.gid, b.branch_id), None) is not None and b.state != "PREPARED":
            b = replace(b, state="PREPARED")
        out.append(b)
    for (gid, branch_id), at in held.items():
        out.append(
            BranchRow(
                gid=gid,
                branch_id=branch_id,
                operation="",
                state="PREPARED",
                prepared_at=at,
                updated_at=at,
            )
        )
    return tuple(out)


_SQLITE_SCHEMA = """
CREATE TABLE accounts (id TEXT PRIMARY KEY, balance INTEGER NOT NULL, held INTEGER NOT NULL);
CREATE TABLE ledger (
    seq INTEGER PRIMARY KEY, gid TEXT NOT NULL, branch_id TEXT NOT NULL, account TEXT NOT NULL,
    delta INTEGER NOT NULL, balance_after INTEGER NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE accord_branches (
    gid TEXT NOT NULL, branch_id TEXT NOT NULL, operation TEXT NOT NULL, state TEXT NOT NULL,
    prepared_at REAL NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (gid, branch_id)
);
CREATE TABLE accord_barrier (
    gid TEXT NOT NULL, branch_id TEXT NOT NULL, op TEXT NOT NULL, status TEXT NOT NULL,
    message TEXT NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (gid, branch_id, op)
);
"""
_SQLITE_AUDIT = """
CREATE TABLE accord_audit (
    seq INTEGER PRIMARY KEY, gid TEXT NOT NULL, branch_id TEXT NOT NULL, op TEXT NOT NULL,
    outcome TEXT NOT NULL, source TEXT NOT NULL, shard TEXT NOT NULL, epoch INTEGER NOT NULL,
    coordinator_address TEXT NOT NULL, detail TEXT NOT NULL, at REAL NOT NULL
);
"""


def _audit_row(a: AuditRow) -> tuple[object, ...]:
    return (
        a.seq,
        a.gid,
        a.branch_id,
        a.op,
        a.outcome.value,
        a.source,
        a.shard,
        a.epoch,
        a.coordinator_address,
        a.detail,
        a.at,
    )


def save_participant(state: ParticipantState, path: Path) -> Path:
    """Writes ``state`` as a SQLite file the checker's :func:`load_participant` reads
    back to the same state (replacing ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.executescript(_SQLITE_SCHEMA + (_SQLITE_AUDIT if state.has_audit else ""))
        conn.executemany(
            "INSERT INTO accounts VALUES (?, ?, ?)",
            [(a.id, a.balance, a.held) for a in state.accounts.values()],
        )
        conn.executemany(
            "INSERT INTO ledger VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (e.seq, e.gid, e.branch_id, e.account, e.delta, e.balance_after, e.created_at)
                for e in state.ledger
            ],
        )
        conn.executemany(
            "INSERT INTO accord_branches VALUES (?, ?, ?, ?, ?, ?)",
            [
                (b.gid, b.branch_id, b.operation, b.state, b.prepared_at, b.updated_at)
                for b in state.branches
            ],
        )
        conn.executemany(
            "INSERT INTO accord_barrier VALUES (?, ?, ?, ?, ?, ?)",
            [(r.gid, r.branch_id, r.op, r.status, r.message, r.created_at) for r in state.barrier],
        )
        if state.has_audit:
            conn.executemany(
                "INSERT INTO accord_audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [_audit_row(a) for a in state.audit],
            )
    return path
