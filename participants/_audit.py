"""Reading a participant's durable audit (``accord_audit``, documented in
:mod:`accord.participants._barrier`) offline: from a database file whose process may be dead or
still running, or from a copy of it, or from a PostgreSQL participant's database (a
``postgresql://`` URL; a read-only transaction).

These readers never write: the file is opened read-only (``mode=ro``), and SQLite
replays a ``-wal`` file left by a killed process into its view without changing the
database. Copy a database with :func:`copy_database`, which goes through SQLite (so
committed pages still in the ``-wal`` file are included); a plain copy of the main file
alone would miss them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accord.participants._barrier import Outcome


@dataclass(frozen=True, kw_only=True)
class AuditRow:
    """One row of ``accord_audit``: one call at one participant and what it did."""

    seq: int
    gid: str
    branch_id: str
    #: ``prepare``, ``commit``, ``one_phase_commit``, ``abort``, ``execute`` or
    #: ``compensate``.
    op: str
    outcome: Outcome
    #: ``coordinator`` or ``resolver``.
    source: str
    shard: str
    epoch: int
    coordinator_address: str
    detail: str
    #: Wall-clock seconds (the participant's ``time.time()``) at the call.
    at: float

    def to_dict(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "gid": self.gid,
            "branch_id": self.branch_id,
            "op": self.op,
            "outcome": self.outcome.value,
            "source": self.source,
            "shard": self.shard,
            "epoch": self.epoch,
            "coordinator_address": self.coordinator_address,
            "detail": self.detail,
            "at": self.at,
        }


@contextmanager
def open_readonly(path: Path | str) -> Iterator[sqlite3.Connection]:
    """A read-only connection to a participant's database file (which must exist)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"participants: no database file at {path}")
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    with closing(conn):
        yield conn


def has_table(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None


def audit_rows(conn: sqlite3.Connection) -> list[AuditRow]:
    """Every audit row, in the order they were written (empty for a database written
    before the audit existed)."""
    if not has_table(conn, "accord_audit"):
        return []
    rows = conn.execute(
        "SELECT seq, gid, branch_id, op, outcome, source, shard, epoch, coordinator_address,"
        " detail, at FROM accord_audit ORDER BY seq"
    ).fetchall()
    return [_row(r) for r in rows]


def read_audit(source: Path | str | sqlite3.Connection) -> list[AuditRow]:
    """The audit of the participant database at ``source`` (a path, opened read-only:
    see the module docstring; a PostgreSQL URL; or an open SQLite connection)."""
    if isinstance(source, sqlite3.Connection):
        return audit_rows(source)
    if isinstance(source, str) and source.startswith(("postgresql://", "postgres://")):
        return _postgres_audit(source)
    with open_readonly(source) as conn:
        return audit_rows(conn)


def _postgres_audit(url: str) -> list[AuditRow]:
    import psycopg

    with psycopg.connect(url, connect_timeout=10) as conn:
        conn.read_only = True
        exists = conn.execute("SELECT to_regclass('accord_audit') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return []
        rows = conn.execute(
            "SELECT seq, gid, branch_id, op, outcome, source, shard, epoch,"
            " coordinator_address, detail, at FROM accord_audit ORDER BY seq"
        ).fetchall()
    return [_row(r) for r in rows]


def _row(r: tuple[Any, ...]) -> AuditRow:
    seq, gid, branch_id, op, outcome, source, shard, epoch, address, detail, at = r
    return AuditRow(
        seq=int(seq),
        gid=str(gid),
        branch_id=str(branch_id),
        op=str(op),
        outcome=Outcome(str(outcome)),
        source=str(source),
        shard=str(shard),
        epoch=int(epoch),
        coordinator_address=str(address),
        detail=str(detail),
        at=float(at),
    )


def copy_database(src: Path | str, dst: Path | str) -> Path:
    """A consistent, self-contained copy of a participant database (SQLite's backup API:
    committed data still in the ``-wal`` file is included; the copy has no ``-wal``).
    Safe while the participant runs; after a SIGKILL it captures exactly what survived."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    with open_readonly(src) as source, closing(sqlite3.connect(dst)) as target:
        source.backup(target)
    return dst
