"""The benchmark's interleaved rounds: the schedule, re-runs of disturbed windows, the
median ratios with their range and CPU per transaction (fake windows, no processes)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bench.ratios import RATIOS, Ratio, bare_of, ratio_pairs
from bench.report import RATIO_KEYS, D, X, build_report, markdown
from bench.rounds import (
    Reruns,
    base_order,
    cpu_us_per_txn,
    measure_window,
    ratio_summaries,
    round_order,
    schedule,
    summarize,
)
from bench.rows import ROWS


def window(
    name: str,
    c: int,
    k: int,
    tps: float,
    *,
    coord: float = 50.0,
    other: float = 0.0,
    kept: bool = True,
    disturbed: bool = False,
) -> dict[str, Any]:
    """A 2-second window at ``tps``: ``coord`` % of a core for the coordinator."""
    return {
        "name": name,
        "concurrency": c,
        "round": k,
        "tps": tps,
        "transactions": int(tps * 2),
        "errors": 0,
        "duration_s": 2.0,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "max_ms": 3.0,
        "client_cpu_pct": 10.0,
        "server_cpu_pct": {"coordinator": coord, "bank-a": 20.0},
        "kernel_cpu_pct": 1.0,
        "other_cpu_pct": other,
        "kept": kept,
        "disturbed": disturbed,
    }


def test_every_round_visits_every_row_at_every_concurrency_in_a_varied_order() -> None:
    rows = ["baseline-2pc", "2pc", "2pc-tls", "saga"]
    plan = schedule(rows, (1, 64), rounds=4)
    assert len(plan) == 4 * 2 * 4
    for k in range(4):
        for c in (1, 64):
            assert sorted(n for kk, cc, n in plan if (kk, cc) == (k, c)) == sorted(rows)
    # A pair runs A B | B A | ... (ABBA), and the third round is rotated, not a repeat.
    assert round_order(rows, 0) == rows
    assert round_order(rows, 1) == rows[::-1]
    assert round_order(rows, 2) != rows and sorted(round_order(rows, 2)) == sorted(rows)
    assert round_order(rows, 3) == round_order(rows, 2)[::-1]
    seq = [n for _, c, n in plan if c == 64 and n in ("baseline-2pc", "2pc")]
    assert seq[:4] == ["baseline-2pc", "2pc", "2pc", "baseline-2pc"]
    # Concurrencies alternate too: round 1 starts where round 0 ended.
    assert next(c for k, c, _ in plan if k == 1) == 64
    assert round_order([], 3) == []


def test_base_order_puts_rows_next_to_what_they_are_compared_with() -> None:
    baselines = {"2pc": "baseline-2pc", "2pc-etcd": "2pc-static", "2pc-static": "baseline-2pc"}
    names = ["baseline-2pc", "2pc", "saga", "2pc-static", "2pc-etcd"]
    assert base_order(names, baselines) == [
        "baseline-2pc",
        "2pc",
        "2pc-static",
        "2pc-etcd",
        "saga",
    ]
    # A row whose baseline is not run starts its own tree; a cycle does not loop.
    assert base_order(["2pc-etcd", "x"], {"2pc-etcd": "2pc-static"}) == ["2pc-etcd", "x"]
    assert sorted(base_order(["a", "b"], {"a": "b", "b": "a"})) == ["a", "b"]


async def _attempts(others: list[float], reruns: Reruns) -> list[dict[str, Any]]:
    it: Iterator[float] = iter(others)

    async def measure() -> dict[str, Any]:
        return window("2pc", 64, 0, 100.0, other=next(it))

    return await measure_window(measure, reruns)


async def test_a_disturbed_window_is_run_again_until_quiet() -> None:
    reruns = Reruns(per_window=2, budget=10, threshold_pct=10.0)
    got = await _attempts([40.0, 12.0, 3.0, 99.0], reruns)
    assert [(w["attempt"], w["disturbed"], w["kept"]) for w in got] == [
        (0, True, False),
        (1, True, False),
        (2, False, True),
    ]
    assert reruns.used == 2
    # A quiet window at once: no re-run.
    assert [w["kept"] for w in await _attempts([10.0], reruns)] == [True]
    # The run's own idle rows do not make a window disturbed; processes outside it do.
    assert not reruns.disturbed({"other_cpu_pct": 25.0, "idle_rows_cpu_pct": 18.0})
    assert reruns.disturbed({"other_cpu_pct": 35.0, "idle_rows_cpu_pct": 18.0})


async def test_re_runs_are_bounded_per_window_and_per_run() -> None:
    reruns = Reruns(per_window=2, budget=3, threshold_pct=10.0)
    got = await _attempts([50.0] * 5, reruns)
    assert len(got) == 3 and got[-1]["kept"] and got[-1]["disturbed"]  # kept, flagged
    got = await _attempts([50.0] * 5, reruns)
    assert len(got) == 2 and reruns.used == 3  # the run's budget ran out
    got = await _attempts([50.0] * 5, reruns)
    assert len(got) == 1 and got[0]["kept"] and got[0]["disturbed"]


def test_results_are_medians_of_the_kept_windows_and_cpu_is_pooled() -> None:
    windows = [
        window("2pc", 64, 0, 100.0, coord=50.0),
        window("2pc", 64, 0, 900.0, kept=False, disturbed=True),  # run again: ignored
        window("2pc", 64, 1, 300.0, coord=90.0, disturbed=True),  # kept flagged
        window("2pc", 64, 2, 200.0, coord=70.0),
    ]
    [r] = summarize(windows)
    assert (r["tps"], r["tps_min"], r["tps_max"], r["rounds"]) == (200.0, 100.0, 300.0, 3)
    assert r["transactions"] == 1200 and r["duration_s"] == 6.0 and r["disturbed_windows"] == 1
    # 2 s each at 50, 90, 70 % of a core = 4.2 CPU s over 1200 transactions = 3500 µs.
    assert r["cpu_us_per_txn"]["coordinator"] == pytest.approx(3500.0)
    assert r["server_cpu_pct"]["coordinator"] == pytest.approx(70.0)
    assert r["cpu_us_per_txn"]["client"] == pytest.approx(0.6 / 1200 * 1e6)
    assert set(cpu_us_per_txn([window("x", 1, 0, 0.0)]).values()) == {0.0}


def test_ratios_pair_the_windows_of_each_round() -> None:
    base = [100.0, 120.0, 80.0]
    row = [50.0, 90.0, 60.0]  # per round: 0.5, 0.75, 0.75
    windows = [window("baseline-2pc", 64, k, t, coord=40.0) for k, t in enumerate(base)]
    windows += [window("2pc", 64, k, t, coord=60.0) for k, t in enumerate(row)]
    windows.append(window("2pc", 64, 1, 1.0, kept=False))  # a discarded attempt
    windows.append(window("2pc-traced", 64, 0, 25.0, coord=60.0, disturbed=True))
    windows.append(window("2pc-traced", 64, 2, 30.0, coord=60.0))  # round 1 lost
    pairs = [Ratio("2pc", "baseline-2pc", target=0.85, headline=True), Ratio("2pc-traced", "2pc")]
    bare = {"2pc-traced": "baseline-2pc", "2pc": "baseline-2pc"}
    q2pc, qtraced = ratio_summaries(windows, pairs, bare)
    assert set(RATIO_KEYS) <= set(q2pc)
    assert (q2pc["median"], q2pc["min"], q2pc["max"], q2pc["rounds"]) == (0.75, 0.5, 0.75, 3)
    assert q2pc["values"] == [0.5, 0.75, 0.75] and q2pc["disturbed_rounds"] == 0
    assert (q2pc["target"], q2pc["headline"]) == (0.85, True)
    # Coordinator CPU per transaction, pooled: 60 % x 6 s / 400 txns against 40 % x 6 s / 600.
    assert q2pc["coordinator_cpu_us"] == pytest.approx(9000.0)
    assert q2pc["baseline_coordinator_cpu_us"] == pytest.approx(4000.0)
    assert q2pc["coordinator_cpu_ratio"] == pytest.approx(2.25)
    assert "bare" not in q2pc  # its baseline is the bare pattern
    assert (qtraced["rounds"], qtraced["values"], qtraced["disturbed_rounds"]) == (
        2,
        [0.5, 0.5],
        1,
    )
    assert qtraced["bare"] == "baseline-2pc"
    assert qtraced["coordinator_cpu_vs_bare"] == pytest.approx(
        qtraced["coordinator_cpu_us"] / 4000.0, rel=1e-3
    )


def test_ratio_table_guards_rows_not_defined_yet() -> None:
    defined: dict[str, str | None] = {
        "baseline-2pc": None,
        "2pc": "baseline-2pc",
        "2pc-traced": "2pc",
        "2pc-new": "2pc",  # a row with baseline= and no table line: a ratio all the same
    }
    table = (
        Ratio("2pc", "baseline-2pc", target=0.85),
        Ratio("2pc-stream-client", "baseline-2pc", target=1.5),
        Ratio("2pc-traced-sampled", "2pc"),
        Ratio("2pc-traced", "2pc"),
    )
    pairs, skipped = ratio_pairs(defined, ["baseline-2pc", "2pc", "2pc-new"], table)
    assert [q.name for q in pairs] == ["2pc/baseline-2pc", "2pc-new/2pc"]
    assert pairs[0].target == 0.85  # the table's line wins over the row's own baseline=
    notes = {s.name: s.note for s in skipped}
    assert notes["2pc-stream-client/baseline-2pc"] == "row 2pc-stream-client not defined yet"
    assert notes["2pc-traced-sampled/2pc"] == "row 2pc-traced-sampled not defined yet"
    assert notes["2pc-traced/2pc"] == "not run (--only)"
    assert bare_of("2pc-traced", defined) == "baseline-2pc"
    assert bare_of("baseline-2pc", defined) == "baseline-2pc"


def test_the_real_table_names_defined_rows_or_the_two_guarded_ones() -> None:
    defined = {s.name: s.baseline for s in ROWS.values()}
    for q in RATIOS:
        assert q.baseline in defined, q.name
        assert q.row in defined or q.row in ("2pc-stream-client", "2pc-traced-sampled"), q.name
    names = [q.name for q in RATIOS]
    assert len(names) == len(set(names))
    for must in ("2pc/baseline-2pc", "saga/baseline-saga", "2pc-etcd/2pc-static"):
        assert must in names


def test_markdown_has_the_readme_tables() -> None:
    windows = [window("baseline-2pc", 64, k, 100.0, coord=40.0) for k in range(3)]
    windows += [window("2pc", 64, k, 50.0 + k, coord=60.0) for k in range(3)]
    report = build_report(
        command="make bench",
        settings={"rounds": 3, "concurrency": [64], "warmup_s": 1.0, "duration_s": 4.0},
        windows=windows,
        pairs=[Ratio("2pc", "baseline-2pc", target=0.85, headline=True)],
        reruns={"used": 1, "budget": 5, "per_window": 2},
        machine={"cpu": "test", "cores": 2, "python": "3.11", "grpcio": "1", "date": "x"},
    )
    text = markdown(report)
    assert f"**0.51{X}** the throughput (median of 3 rounds, 0.50{D}0.52)" in text
    assert f"| `2pc` / `baseline-2pc` | 0.51 [0.50{D}0.52] | 3 | 0.85 |" in text
    assert (
        "| row | load generator | coordinator | bank-a | other servers | kernel | total |" in text
    )
    assert f"| `baseline-2pc` | 100 [100{D}100] | 1.0 / 2.0 |" in text
    assert "1 disturbed windows run again" in text
    assert "idle processes used 0 % of a core (median)" in text


def test_quick_and_full_presets_and_explicit_options() -> None:
    from bench.run import FULL, QUICK, parse_args

    full = parse_args([])
    assert (full.rounds, full.concurrency, full.duration) == (
        FULL["rounds"],
        FULL["concurrency"],
        FULL["duration"],
    )
    quick = parse_args(["--quick", "--rounds", "4"])
    assert quick.rounds == 4 and quick.concurrency == QUICK["concurrency"]
    assert quick.warmup == QUICK["warmup"] and quick.rerun_share == QUICK["rerun_share"]
    assert min(FULL["rounds"], QUICK["rounds"]) >= 3
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "0"])
