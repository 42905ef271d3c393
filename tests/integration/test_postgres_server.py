"""The PostgreSQL server helper the PostgreSQL tests, the demo and the chaos harness use:
prepared transactions survive its immediate shutdown, and a restart keeps port and
data."""

from __future__ import annotations

from pathlib import Path

import psycopg

from accord.tools.topology import PostgresServer


def test_prepared_transaction_survives_immediate_shutdown(tmp_path: Path) -> None:
    server = PostgresServer(tmp_path, name="pg")
    try:
        server.start()
        url = server.create_database("survive")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (v int)")
        with psycopg.connect(url) as conn:
            conn.execute("INSERT INTO t VALUES (1)")
            conn.execute("PREPARE TRANSACTION 'accord-test'")
        pid, port = server.pid, server.port
        server.kill()
        assert not server.alive()
        server.start()
        assert server.port == port and server.pid != pid
        with psycopg.connect(url, autocommit=True) as conn:
            rows = conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall()
            assert rows == [("accord-test",)]
            conn.execute("COMMIT PREPARED 'accord-test'")
            assert conn.execute("SELECT v FROM t").fetchall() == [(1,)]
        assert server.stop() == 0
        assert server.stop() == 0  # safe twice
    finally:
        server.remove()
    assert (tmp_path / "pg.log").read_text()
