"""The backend seam: a db string picks SQLite or PostgreSQL (PostgreSQL imported only
then), and the PostgreSQL prepared transaction names (format, escaping, length)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from accord.participants import BackendStartError, SqliteBackend, is_postgres_url, open_backend
from accord.participants._pg import (
    PostgresBackend,
    connect_error,
    describe_url,
    parse_transaction_name,
    transaction_name,
)


def test_db_string_picks_the_backend(tmp_path: Path) -> None:
    assert isinstance(open_backend(tmp_path / "p.db"), SqliteBackend)
    assert isinstance(open_backend(str(tmp_path / "p.db")), SqliteBackend)
    pg = open_backend("postgresql://u@h:5/db", lock_timeout_s=1.5, max_batch=9)
    assert isinstance(pg, PostgresBackend) and pg.lock_timeout_s == 1.5
    assert isinstance(open_backend("postgres://u@h/db"), PostgresBackend)
    assert open_backend(pg) is pg
    assert is_postgres_url("postgresql://x") and not is_postgres_url("pg.db")
    assert pg.location == "postgresql://u@h:5/db"


def test_sqlite_participants_do_not_import_psycopg() -> None:
    code = "import sys, accord.participants; assert 'psycopg' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_transaction_names() -> None:
    assert transaction_name(16384, "s1:0190c1a2b3c4deadbeef00000001", "b0") == (
        "accord:16384:s1:0190c1a2b3c4deadbeef00000001/b0"
    )
    odd = transaction_name(7, "g'1/x", "b %2 é")
    assert "'" not in odd and " " not in odd and odd.count("/") == 1
    assert parse_transaction_name(odd) == (7, "g'1/x", "b %2 é")
    assert transaction_name(1, "a/b", "c") != transaction_name(1, "a", "b/c")
    assert parse_transaction_name("other") is None
    assert parse_transaction_name("accord:x:g/b") is None
    assert len(transaction_name(1, "g" * 150, "b" * 39).encode()) <= 199
    with pytest.raises(ValueError, match="too long"):
        transaction_name(1, "g" * 150, "b" * 50)


def test_connect_errors_name_the_cause_in_one_line() -> None:
    url = "postgresql://alice:secret@db.example:6543/orders"
    assert describe_url(url) == "alice@db.example:6543/orders"  # never the password
    err = connect_error(
        url, OSError('connection failed: FATAL:  database "orders"\n does not exist')
    )
    assert isinstance(err, BackendStartError) and "\n" not in str(err)
    assert "the database does not exist" in str(err) and "secret" not in str(err)
    auth = connect_error(url, OSError('password authentication failed for user "alice"'))
    assert "authentication failed" in str(auth)
