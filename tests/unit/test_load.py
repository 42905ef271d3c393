"""``accord load`` without processes: the open-loop timetable (coordinated omission is not
hidden), the closed loop, exact histogram merging, the report's shape, the workload and
the validation of the flags."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from hdrh.histogram import HdrHistogram
from typer.testing import CliRunner

from accord.tools._load import (
    Bounds,
    LoadSettings,
    Recorder,
    build_plan,
    new_histogram,
    pad,
    run_closed_loop,
    run_open_loop,
)
from accord.tools._load_report import build_report, merge_histograms, merge_progress
from accord.tools._load_view import render_table
from accord.tools.cli import app

pytestmark = pytest.mark.timeout(60)


def _slow_once(stall_at: int, stall_s: float, normal_s: float = 0.002):
    """A transaction function that answers in ``normal_s``, except call ``stall_at``."""
    calls = 0

    async def txn() -> tuple[str, str]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(stall_s if calls == stall_at else normal_s)
        return "COMMITTED", ""

    return txn


def _at_least(hist: HdrHistogram, us: int) -> int:
    return sum(
        item.count_at_value_iterated_to
        for item in hist.get_recorded_iterator()
        if item.value_iterated_to >= us
    )


def _bounds(*, transactions: int | None = None, duration_s: float | None = None) -> Bounds:
    return Bounds(
        start=time.perf_counter(),
        warmup_s=0.0,
        duration_s=duration_s,
        transactions=transactions,
        timeout_s=10.0,
    )


async def test_open_loop_latency_counts_from_the_intended_start() -> None:
    """One stall of 300 ms with one slot at 200/s: every transaction due during the
    stall waits for it, and the wait is in its latency (60 slots fall in the stall)."""
    bounds = _bounds(transactions=100)
    rec = Recorder(bounds.measure_from)
    await run_open_loop(_slow_once(10, 0.3), 1, 1 / 200, bounds, rec)
    assert rec.hist.get_total_count() == 100 and rec.outcomes["COMMITTED"] == 100
    assert rec.hist.get_max_value() >= 290_000
    assert _at_least(rec.hist, 100_000) >= 30, "the stall must show in many latencies"
    assert rec.late >= 30 and rec.scheduled == 100 and rec.dropped == 0
    assert rec.max_start_delay_s >= 0.25


async def test_closed_loop_sees_the_same_stall_once() -> None:
    """The contrast: a closed loop measures from the actual start, so the same stall is
    one slow transaction (which is why the open loop is there)."""
    bounds = _bounds(transactions=100)
    rec = Recorder(bounds.measure_from)
    await run_closed_loop(_slow_once(10, 0.3), 1, bounds, rec)
    assert rec.hist.get_total_count() == 100
    assert _at_least(rec.hist, 100_000) == 1


async def test_open_loop_counts_what_it_could_not_start_as_dropped() -> None:
    bounds = _bounds(duration_s=0.3)
    rec = Recorder(bounds.measure_from)
    await run_open_loop(_slow_once(1, 0.5), 1, 0.01, bounds, rec)
    # Slot 0 took the only slot for 0.5 s: slots 1..29 were due before the end.
    assert rec.scheduled == 1 and rec.dropped == 29
    assert rec.outcomes["COMMITTED"] == 1


async def test_open_loop_keeps_the_rate_and_warmup_is_not_measured() -> None:
    bounds = Bounds(
        start=time.perf_counter(), warmup_s=0.2, duration_s=0.5, transactions=None, timeout_s=5
    )
    rec = Recorder(bounds.measure_from)
    t0 = time.perf_counter()
    await run_open_loop(_slow_once(0, 0), 4, 0.01, bounds, rec)
    assert 0.65 < time.perf_counter() - t0 < 1.5
    assert 48 <= rec.outcomes["COMMITTED"] <= 50, "0.5 s at 100/s, warmup left out"


async def test_closed_loop_errors_and_timeouts_are_counted_by_code() -> None:
    from accord.client._errors import UnavailableError

    calls = 0

    async def txn() -> tuple[str, str]:
        nonlocal calls
        calls += 1
        if calls % 3 == 0:
            raise UnavailableError("UNAVAILABLE: down")
        if calls % 3 == 1:
            await asyncio.sleep(1)
        return "ABORTED", "insufficient funds"

    bounds = Bounds(
        start=time.perf_counter(), warmup_s=0, duration_s=None, transactions=9, timeout_s=0.05
    )
    rec = Recorder(bounds.measure_from)
    await run_closed_loop(txn, 1, bounds, rec)
    assert rec.errors == {"UNAVAILABLE": 3, "DEADLINE_EXCEEDED": 3}
    assert rec.outcomes == {"ABORTED": 3}
    assert rec.samples["ABORTED"] == "insufficient funds"
    assert rec.hist.get_total_count() == 3, "client errors are counted, not timed"


def _worker_result(index: int, values_us: list[int], *, cpu_s: float = 0.1) -> dict[str, Any]:
    rec = Recorder(0.0)
    for i, v in enumerate(values_us):
        finish = i * 0.01
        rec.outcome("COMMITTED", "", finish - v / 1e6, finish)
    rec.error("UNAVAILABLE", "UNAVAILABLE: gone", 0.5)
    rec.finished_at = len(values_us) * 0.01
    return {"index": index, "pid": 100 + index, "cpu_s": cpu_s, "wall_s": 1.0, **rec.export()}


def test_histograms_merge_exactly_across_workers() -> None:
    a = [1_000 + 37 * i for i in range(150)]
    b = [5_000 + 911 * i for i in range(150)]
    ra, rb = _worker_result(0, a), _worker_result(1, b)
    # Through JSON, as they come from worker processes.
    ra, rb = json.loads(json.dumps(ra)), json.loads(json.dumps(rb))
    merged = merge_histograms([ra["hist"], rb["hist"]])
    direct = new_histogram()
    for v in a + b:
        direct.record_value(v)
    assert merged.get_total_count() == 300
    for p in (1, 50, 90, 99, 99.9, 100):
        assert merged.get_value_at_percentile(p) == direct.get_value_at_percentile(p)
    assert merged.get_max_value() == direct.get_max_value()

    s = LoadSettings(coordinator="x:1", transactions=302, processes=2, concurrency=2)
    report = build_report(s, [ra, rb], started_unix=0.0).data
    assert report["transactions"] == 302 and report["outcomes"] == {"COMMITTED": 300}
    assert report["errors"] == {"UNAVAILABLE": 2}
    assert report["latency_ms"]["p99"] == round(direct.get_value_at_percentile(99) / 1000, 3)
    assert sum(round(t["tps"] * 1) for t in report["timeline"]) >= 300
    assert HdrHistogram.decode(report["histogram"]).get_total_count() == 300


def test_report_shape_and_saturation_warning() -> None:
    s = LoadSettings(coordinator="x:1", duration_s=1.0, rate=300.0, concurrency=4, processes=2)
    results = [_worker_result(0, [2_000] * 100, cpu_s=0.95), _worker_result(1, [3_000] * 100)]
    results[0].update(late=3, dropped=2, scheduled=100)
    report = build_report(s, results, started_unix=1.0, parent_cpu=(0.05, 1.0))
    data = report.data
    assert set(data) >= {
        "settings",
        "duration_s",
        "transactions",
        "throughput_tps",
        "latency_ms",
        "outcomes",
        "errors",
        "open_loop",
        "timeline",
        "generator",
        "warnings",
        "histogram",
    }
    assert set(data["latency_ms"]) >= {"p50", "p90", "p99", "p99.9", "max"}
    assert data["settings"]["loop"] == "open" and data["settings"]["rate"] == 300.0
    assert data["open_loop"]["late"] == 3 and data["open_loop"]["dropped"] == 2
    assert data["timeline"][0].keys() == {"t_s", "tps", "errors", "p50_ms", "p99_ms"}
    gen = data["generator"]
    assert [p["cpu_pct"] for p in gen["processes"]] == [95.0, 10.0]
    assert gen["saturated"] and gen["parent_cpu_pct"] == 5.0
    assert any("CPU saturation" in w for w in data["warnings"])
    assert any("late" in w for w in data["warnings"]) and any(
        "dropped" in w or "never started" in w for w in data["warnings"]
    )
    assert report.exit_code == 0
    json.dumps(data)  # JSON-able as it is
    render_table(data)  # and the table renders

    failed = build_report(s, [_worker_result(0, [])], started_unix=1.0)
    assert failed.exit_code == 1 and "no transaction succeeded" in failed.data["warnings"]


def test_progress_merges_snapshots() -> None:
    r0, r1 = Recorder(0.0), Recorder(0.0)
    r0.outcome("COMMITTED", "", 0.0, 0.010)
    r1.outcome("COMPLETED", "", 0.0, 0.020)
    r1.error("UNAVAILABLE", "x", 0.3)
    p = merge_progress({0: r0.progress(1.0), 1: r1.progress(2.0)})
    assert p["count"] == 3 and p["measured_s"] == 2.0
    assert p["outcomes"] == {"COMMITTED": 1, "COMPLETED": 1} and p["errors"] == {"UNAVAILABLE": 1}
    assert 9 < p["p50_ms"] < 11 and 19 < p["p99_ms"] < 21


def test_share_splits_concurrency_transactions_and_rate() -> None:
    s = LoadSettings(coordinator="x:1", transactions=101, rate=90.0, concurrency=7, processes=3)
    shares = [s.share(i) for i in range(3)]
    assert sum(x.concurrency for x in shares) == 7
    assert sum(x.transactions or 0 for x in shares) == 101
    # Every process takes every third slot of the 90/s timetable, offset by one slot.
    assert all(x.interval_s == pytest.approx(3 / 90) for x in shares)
    assert [x.phase_s for x in shares] == pytest.approx([0, 1 / 90, 2 / 90])


def test_workload_plan() -> None:
    import random

    s = LoadSettings(
        coordinator="x:1", duration_s=1, branches=4, payload_bytes=300, accounts=10, mode="mixed"
    )
    plan = build_plan(s, random.Random(1), size=200)
    kinds = {"2pc" if t.branches else "saga" for t in plan}
    assert kinds == {"2pc", "saga"}
    for t in plan:
        if t.branches:
            debit, *credits = t.branches
            ops = [b.operation for b in t.branches]
            assert ops == ["debit", "credit", "credit", "credit"]
            payloads = [json.loads(b.payload) for b in t.branches]  # type: ignore[arg-type]
            assert payloads[0]["amount"] == sum(p["amount"] for p in payloads[1:])
            assert all(
                p["account"].startswith(b.service + "-")
                for p, b in zip(payloads, t.branches, strict=True)
            )
            assert all(290 <= len(b.payload) <= 300 for b in t.branches)
            assert debit.service not in {c.service for c in credits}
        else:
            steps = t.steps
            assert [(st.action, st.compensation) for st in steps] == [("debit", "refund")] + [
                ("credit", "uncredit")
            ] * 3
            assert all(st.depends_on == ("debit",) for st in steps[1:])
    assert len(pad({"account": "a", "amount": 1}, 10)) < 40  # never truncated
    assert len(pad({"account": "a", "amount": 1}, 1000)) == 1000


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"coordinator": ""}, "exactly one of --coordinator"),
        ({"etcd": "http://127.0.0.1:2379"}, "exactly one of --coordinator"),
        ({"duration_s": None}, "exactly one of --duration"),
        ({"transactions": 5}, "exactly one of --duration"),
        ({"rate": 0.0}, "--rate must be > 0"),
        ({"rate": -3.0}, "--rate must be > 0"),
        ({"mode": "3pc"}, "--mode must be one of"),
        ({"concurrency": 0}, "--concurrency"),
        ({"processes": 9}, "--processes"),
        ({"branches": 1}, "--branches"),
        ({"services": ("bank-a", "")}, "--services"),
        ({"accounts": 0}, "--accounts"),
        ({"duration_s": 0.0}, "--duration must be > 0"),
    ],
)
def test_validation(changes: dict[str, Any], message: str) -> None:
    good = {"coordinator": "127.0.0.1:7070", "duration_s": 1.0, "concurrency": 8}
    LoadSettings(**good).validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        LoadSettings(**{**good, **changes}).validate()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--duration", "1"], "exactly one of --coordinator"),
        (["-c", "127.0.0.1:1", "--duration", "1", "--transactions", "5"], "exactly one of"),
        (["-c", "127.0.0.1:1", "--duration", "1", "--rate", "0"], "--rate must be > 0"),
    ],
)
def test_bad_flags_are_one_line_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["load", *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
