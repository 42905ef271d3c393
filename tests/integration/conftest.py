"""Integration tier: real processes on 127.0.0.1 (coordinator, bank participants), real
gRPC, real WAL files, real SQLite. Every process a test starts is stopped by PID in
teardown."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

import accord.bank.v1 as bankpb
from clients._procs import ManagedProcess, stop_all


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """Starts Accord processes for one test; all of them are stopped at teardown."""

    root: Path
    procs: list[ManagedProcess] = field(default_factory=list)

    def bank(
        self,
        name: str,
        *,
        port: int = 0,
        in_doubt_after_s: float = 30.0,
        env: dict[str, str] | None = None,
        extra: list[str] | None = None,
    ) -> ManagedProcess:
        p = ManagedProcess.accord(
            name,
            [
                "participant",
                "bank",
                "--listen",
                f"127.0.0.1:{port}",
                "--db",
                str(self.root / f"{name}.db"),
                "--service",
                name,
                "--in-doubt-after-s",
                str(in_doubt_after_s),
                "--log-level",
                "warning",
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
