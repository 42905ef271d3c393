"""The topology harness without starting anything: reserved ports, the command lines it
builds, its working directories."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from accord.tools.topology import Topology, free_port, workdir


def test_a_reserved_port_is_not_handed_out_again_but_can_be_bound() -> None:
    reserved = {free_port() for _ in range(20)}
    assert len(reserved) == 20
    probes = []
    try:
        for _ in range(500):
            s = socket.socket()
            probes.append(s)
            s.bind(("127.0.0.1", 0))
            assert s.getsockname()[1] not in reserved
    finally:
        for s in probes:
            s.close()
    with socket.socket() as server:  # as gRPC and etcd bind: SO_REUSEADDR
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", reserved.pop()))
        server.listen()


def _args(argv: list[str]) -> list[str]:
    assert argv[:3] == [sys.executable, "-m", "accord.tools.cli"]
    return argv[3:]


def test_command_lines(tmp_path: Path) -> None:
    topo = Topology(tmp_path, env={"A": "1"})
    bank = topo.bank(
        "bank-1", port=7101, etcd="http://e", instance_id="bank-1", ttl_s=2, accounts=3,
        initial_balance=10, in_doubt_after_s=5, env={"B": "2"}, start=False,
    )  # fmt: skip
    assert _args(bank.argv) == [
        "participant", "bank", "--listen", "127.0.0.1:7101", "--db", str(tmp_path / "bank-1.db"),
        "--service", "bank-1", "--etcd", "http://e", "--instance-id", "bank-1", "--ttl", "2",
        "--in-doubt-after-s", "5", "--log-level", "warning", "--accounts", "3",
        "--initial-balance", "10",
    ]  # fmt: skip
    assert bank.env == {"A": "1", "B": "2"} and bank.log_path == tmp_path / "bank-1.log"
    car = topo.participant("car", extra=["--fail-city", "Paris"], start=False)
    assert _args(car.argv) == [
        "participant", "car", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "car.db"),
        "--log-level", "warning", "--fail-city", "Paris",
    ]  # fmt: skip
    alone = topo.bank("b", standalone=True, service="bank", log_level="INFO", start=False)
    assert alone.argv == [
        sys.executable, "-m", "accord.participants.bank", "--listen", "127.0.0.1:0",
        "--db", str(tmp_path / "b.db"), "--service", "bank", "--log-level", "INFO",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="does not register"):
        topo.bank("c", standalone=True, etcd="http://e", start=False)
    standby = topo.coordinator(
        "c1", cid="c1", shard="s1", wal="wal-s1", etcd="http://e", role="standby",
        ttl_s=2, log_level=None, start=False,
    )  # fmt: skip
    assert _args(standby.argv) == [
        "coordinator", "--listen", "127.0.0.1:0", "--wal-dir", str(tmp_path / "wal-s1"),
        "--etcd", "http://e", "--id", "c1", "--shard", "s1", "--ttl", "2",
    ]  # fmt: skip
    assert standby.ready_prefix == "standby for shard"
    static = topo.coordinator(services={"bank-a": "127.0.0.1:1"}, transport="unary", start=False)
    assert _args(static.argv) == [
        "coordinator", "--listen", "127.0.0.1:0", "--wal-dir", str(tmp_path / "wal"),
        "--service=bank-a=127.0.0.1:1", "--participant-transport", "unary",
        "--log-level", "warning",
    ]  # fmt: skip
    # Registered, in order; nothing started, so stopping is a no-op (and safe twice).
    assert topo.procs == [bank, car, alone, standby, static]
    topo.stop()
    topo.stop()


def test_workdir_removes_only_what_it_made(tmp_path: Path) -> None:
    given = tmp_path / "given" / "deep"
    with workdir(given, prefix="x-") as d:
        assert d == given and d.is_dir()
    assert given.is_dir()
    with workdir(None, prefix="accord-test-") as d:
        made = d
        assert made.name.startswith("accord-test-")
    assert not made.exists()
    with workdir(None, prefix="accord-test-", keep=True) as d:
        kept = d
    assert kept.is_dir()
    kept.rmdir()
