"""The benchmark harness: report format, ratios and the closed-loop generator (fast, no
processes)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from bench.baseline import parse_services
from bench.load import (
    LoadResult,
    LoadSettings,
    TxnFn,
    kernel_cpu_s,
    kernel_threads_cpu,
    machine_busy_s,
    process_cpu_s,
    run_closed_loop,
)
from bench.ratios import Ratio
from bench.report import RESULT_KEYS, build_report, result_row, write_report
from bench.rounds import ratio_summaries
from bench.rows import ROWS
from bench.run import _int_list


def _load(concurrency: int, tps: float) -> LoadResult:
    return LoadResult(
        concurrency=concurrency,
        transactions=int(tps * 10),
        errors=0,
        duration_s=10.0,
        tps=tps,
        p50_ms=1.0,
        p99_ms=2.0,
        max_ms=3.0,
        client_cpu_pct=10.0,
        server_cpu_pct={"coordinator": 50.0},
    )


def test_result_row_has_the_contract_keys() -> None:
    row = result_row("2pc", _load(16, 400.0))
    assert set(RESULT_KEYS) <= set(row)
    assert row["name"] == "2pc" and row["concurrency"] == 16 and row["tps"] == 400.0


def test_ratios_only_between_rows_of_the_same_run() -> None:
    def w(name: str, c: int, tps: float) -> dict[str, object]:
        return {**result_row(name, _load(c, tps)), "round": 0}

    windows = [
        w("baseline-2pc", 1, 200.0),
        w("baseline-2pc", 64, 500.0),
        w("2pc", 1, 100.0),
        w("2pc", 64, 450.0),
        w("2pc", 16, 300.0),  # no baseline at 16: no ratio
        w("saga", 64, 300.0),  # its baseline did not run: no ratio
    ]
    out = ratio_summaries(windows, [Ratio("2pc", "baseline-2pc"), Ratio("saga", "baseline-saga")])
    assert [(q["name"], q["concurrency"], q["median"], q["rounds"]) for q in out] == [
        ("2pc/baseline-2pc", 1, 0.5, 1),
        ("2pc/baseline-2pc", 64, 0.9, 1),
    ]


def test_report_json_shape(tmp_path: Path) -> None:
    report = build_report(
        command="python -m bench.run",
        settings={"concurrency": [1]},
        windows=[{**result_row("baseline-2pc", _load(1, 200.0)), "round": 0, "kept": True}],
        pairs=[Ratio("2pc", "baseline-2pc")],
        failures=[{"name": "2pc", "error": "boom"}],
    )
    path = tmp_path / "out" / "results.json"
    write_report(path, report)
    data = json.loads(path.read_text())
    assert {"machine", "command", "results", "ratios", "failures", "windows"} <= set(data)
    assert data["ratios"] == []  # 2pc did not run
    assert set(RESULT_KEYS) <= set(data["results"][0])
    for key in ("cpu", "cores", "python", "grpcio", "protobuf", "uvloop", "platform", "date"):
        assert key in data["machine"]
    assert data["results"][0]["name"] == "baseline-2pc"
    assert data["failures"] == [{"name": "2pc", "error": "boom"}]


def test_rows_registry_and_arguments() -> None:
    assert list(ROWS)[:2] == ["baseline-2pc", "2pc"]
    assert ROWS["2pc"].baseline == "baseline-2pc"
    assert _int_list("1,16,64") == (1, 16, 64)
    assert parse_services(["bank-a=127.0.0.1:1"]) == {"bank-a": "127.0.0.1:1"}
    with pytest.raises(ValueError):
        parse_services(["bank-a"])


def test_process_cpu_of_self() -> None:
    assert process_cpu_s(os.getpid()) >= 0.0
    assert process_cpu_s(2**22 + 12345) == 0.0  # no such process
    assert machine_busy_s() >= process_cpu_s(os.getpid()) > 0.0
    snap = kernel_threads_cpu()
    assert kernel_cpu_s(snap, snap) == 0.0
    # A kernel thread that exited is not a negative amount.
    assert kernel_cpu_s({1: 500, 2: 10}, {2: 10 + os.sysconf("SC_CLK_TCK")}) == 1.0


async def test_closed_loop_counts_and_errors() -> None:
    calls = 0

    def factory(i: int) -> TxnFn:
        async def txn() -> bool:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.001)
            if i == 0 and calls % 5 == 0:
                raise RuntimeError("injected")
            return i != 1  # worker 1's transactions "abort"

        return txn

    result = await run_closed_loop(
        factory, LoadSettings(concurrency=4, warmup_s=0.05, duration_s=0.3)
    )
    assert result.concurrency == 4
    assert result.transactions > 0 and result.errors > 0
    assert result.tps > 0 and 0 < result.p50_ms <= result.p99_ms <= result.max_ms
    assert 0.25 < result.duration_s < 1.0
    assert any("injected" in s for s in result.error_samples)


async def test_closed_loop_bounded_in_count() -> None:
    def factory(i: int) -> TxnFn:
        async def txn() -> bool:
            await asyncio.sleep(0)
            return True

        return txn

    result = await run_closed_loop(
        factory,
        LoadSettings(concurrency=2, warmup_s=0.0, duration_s=30.0, max_transactions=50),
    )
    assert 50 <= result.transactions < 60
    assert result.duration_s < 5.0
