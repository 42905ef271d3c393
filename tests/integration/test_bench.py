"""``python -m bench.run`` end to end at its quickest: two rows in three interleaved
rounds, real processes, a JSON report with a valid ``ratios`` section, and the README's
tables from it (``python -m bench.report --markdown``). No speed is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.report import RATIO_KEYS, RESULT_KEYS

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


def test_bench_run_writes_median_ratios_of_interleaved_rounds(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    args = [
        *("--out", str(out), "--only", "baseline-2pc,2pc", "--rounds", "3"),
        *("--concurrency", "4", "--warmup", "0.2", "--duration", "0.5"),
        *("--max-reruns", "1", "--rerun-budget", "2", "--data-dir", str(tmp_path / "data")),
    ]
    # bench.run stops every process it started (by PID) before it exits, also on errors;
    # the timeout is the bound on a hung run.
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    assert report["settings"]["rounds"] == 3

    # Every window of the schedule ran; at most the budget's re-runs on top; one kept
    # window per row and round.
    windows = report["windows"]
    kept = [w for w in windows if w["kept"]]
    assert sorted((w["name"], w["round"]) for w in kept) == sorted(
        (n, k) for n in ("baseline-2pc", "2pc") for k in range(3)
    )
    assert len(windows) - len(kept) == report["reruns"]["used"] <= 2
    # The rounds alternate the order: ABBA over the first two.
    kept_order = [w["name"] for w in kept]
    assert kept_order[:4] == ["baseline-2pc", "2pc", "2pc", "baseline-2pc"]

    results = {r["name"]: r for r in report["results"]}
    assert set(results) == {"baseline-2pc", "2pc"}
    for r in results.values():
        assert set(RESULT_KEYS) <= set(r)
        assert r["rounds"] == 3 and r["concurrency"] == 4 and r["transactions"] > 0
        assert r["tps_min"] <= r["tps"] <= r["tps_max"]
        cpu = r["cpu_us_per_txn"]
        assert {"client", "coordinator", "bank-a", "bank-b", "kernel"} <= set(cpu)
        assert cpu["coordinator"] > 0 and cpu["client"] > 0

    [q] = [q for q in report["ratios"] if q["name"] == "2pc/baseline-2pc"]
    assert set(RATIO_KEYS) <= set(q)
    assert q["concurrency"] == 4 and q["rounds"] == 3 and len(q["values"]) == 3
    assert 0 < q["min"] <= q["median"] <= q["max"]
    assert q["target"] == 0.85
    assert q["coordinator_cpu_us"] == results["2pc"]["cpu_us_per_txn"]["coordinator"]
    assert q["coordinator_cpu_ratio"] > 0
    # The table's lines whose rows did not run are skipped, with a note.
    skipped = {s["name"]: s["note"] for s in report["skipped_ratios"]}
    assert "saga/baseline-saga" in skipped
    assert "2pc-stream-client/baseline-2pc" in skipped

    md = subprocess.run(
        [sys.executable, "-m", "bench.report", str(out), "--markdown"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "| `2pc` / `baseline-2pc` |" in md
    assert "| row | load generator | coordinator | bank-a | bank-b |" in md
