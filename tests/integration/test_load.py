"""``accord load`` as a user runs it: a subprocess against a real coordinator and two real
bank participants (their accounts seeded with ``--accounts``), 2PC, sagas, both in two
worker processes, an open loop at a fixed rate, through etcd, and the plot. Money is
conserved after every run."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, balances

pytestmark = pytest.mark.integration

BANKS = ("bank-a", "bank-b")
ACCOUNTS = 20
BALANCE = 1000
SEED = ["--accounts", str(ACCOUNTS), "--initial-balance", str(BALANCE)]
TOTAL = len(BANKS) * ACCOUNTS * BALANCE


def load(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "accord.tools.cli", "load", "--accounts", str(ACCOUNTS), *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def report(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


async def assert_money_conserved(addresses: dict[str, str]) -> None:
    async def totals() -> list[tuple[int, int]]:
        out = []
        for addr in addresses.values():
            b = await balances(addr)
            out.append((b.total, b.prepared_branches))
        return out

    await assert_eventually(
        totals,
        lambda ts: all(prepared == 0 for _, prepared in ts) and sum(t for t, _ in ts) == TOTAL,
        what="every branch finished and the money in the banks unchanged",
    )


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """One coordinator and two banks (static service map) for the module's runs."""
    cluster = Cluster(tmp_path_factory.mktemp("load"))
    try:
        banks = {name: cluster.bank(name, extra=SEED).address for name in BANKS}
        yield cluster.coordinator(banks).address, banks
    finally:
        cluster.stop()


async def test_2pc_transactions_json_and_plot(
    topology: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    coord, banks = topology
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    proc = load(
        "-c", coord, "--mode", "2pc", "--transactions", "200", "--concurrency", "8",
        "--json", str(out), "--plot", str(png),
    )  # fmt: skip
    r = report(out)
    assert r["transactions"] == 200
    assert r["outcomes"].get("COMMITTED", 0) > 0 and r["errors"] == {}
    assert sum(r["outcomes"].values()) == 200
    lat = r["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert r["throughput_tps"] > 0 and r["timeline"] and r["generator"]["processes"]
    assert r["settings"]["mode"] == "2pc" and r["settings"]["loop"] == "closed"
    assert "throughput" in proc.stdout and "latency p99" in proc.stdout  # the table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    await assert_money_conserved(banks)


async def test_saga_short_run(topology: tuple[str, dict[str, str]]) -> None:
    coord, banks = topology
    proc = load(
        "-c", coord, "--mode", "saga", "--duration", "1", "--concurrency", "4",
        "--branches", "3", "--payload-bytes", "512", "--json", "-",
    )  # fmt: skip
    r = json.loads(proc.stdout)  # --json -: only the report on stdout
    assert r["outcomes"].get("COMPLETED", 0) > 0 and r["errors"] == {}
    assert r["duration_s"] >= 1.0
    assert r["duration_s"] < 5
    assert "latency p99" in proc.stderr  # the table went to stderr
    await assert_money_conserved(banks)


async def test_mixed_in_two_processes(topology: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    coord, banks = topology
    out = tmp_path / "r.json"
    load(
        "-c", coord, "--mode", "mixed", "--processes", "2", "--duration", "3",
        "--concurrency", "8", "--warmup", "0.5", "--json", str(out),
    )  # fmt: skip
    r = report(out)
    procs = r["generator"]["processes"]
    assert len(procs) == 2 and len({p["pid"] for p in procs}) == 2
    assert r["outcomes"].get("COMMITTED", 0) > 0 and r["outcomes"].get("COMPLETED", 0) > 0
    assert r["errors"] == {}
    # The merged histogram holds every measured transaction of both processes.
    from hdrh.histogram import HdrHistogram

    assert HdrHistogram.decode(r["histogram"]).get_total_count() == r["transactions"]
    assert 3.0 <= r["duration_s"] < 6 and len(r["timeline"]) == 3
    await assert_money_conserved(banks)


async def test_open_loop_at_a_fixed_rate(
    topology: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    coord, banks = topology
    out = tmp_path / "r.json"
    load("-c", coord, "--rate", "50", "--duration", "2", "--concurrency", "8", "--json", str(out))
    r = report(out)
    assert 95 <= r["transactions"] <= 101, r["transactions"]
    assert r["open_loop"]["scheduled"] == r["transactions"]
    assert r["open_loop"]["dropped"] == 0
    assert 45 <= r["throughput_tps"] <= 55
    await assert_money_conserved(banks)


def test_unreachable_coordinator_fails_in_one_line() -> None:
    from tests.integration.conftest import free_port

    proc = load("-c", f"127.0.0.1:{free_port()}", "--transactions", "5", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "cannot reach the coordinator" in proc.stderr


async def test_through_etcd(cluster: Cluster, tmp_path: Path) -> None:
    etcd = cluster.etcd()
    banks = {name: cluster.bank(name, etcd=etcd.url, extra=SEED).address for name in BANKS}
    cluster.coordinator({}, etcd=etcd.url)
    out = tmp_path / "r.json"
    load("--etcd", etcd.url, "--transactions", "100", "--concurrency", "4", "--json", str(out))
    r = report(out)
    assert r["transactions"] == 100 and r["outcomes"].get("COMMITTED", 0) > 0
    assert r["settings"]["etcd"] == etcd.url
    await assert_money_conserved(banks)
