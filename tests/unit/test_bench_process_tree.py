"""A server that forks a process per connection (PostgreSQL) is measured as a process
tree: its live descendants and the children it has reaped count as its CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench.load import process_cpu_s, process_tree_cpu_s
from bench.plot import cpu_ms_per_txn

#: CPU times come in clock ticks (1/100 s) summed as floats: one tick of slack.
_TICK = 0.011
_BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"


def _children_cpu_s() -> float:
    """The tree's CPU without this process's own."""
    me = os.getpid()
    return process_tree_cpu_s(me) - process_cpu_s(me)


def test_live_and_reaped_children_count() -> None:
    before = _children_cpu_s()
    # A live child that has burnt 0.3 s and now waits for its stdin to close.
    live = subprocess.Popen(
        [sys.executable, "-c", _BURN + "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        while process_cpu_s(live.pid) < 0.3:
            time.sleep(0.01)
        assert _children_cpu_s() - before >= 0.3 - _TICK
    finally:
        assert live.stdin is not None
        live.stdin.close()
        live.wait(10)
    # Once reaped, its time stays in the tree (in our cutime), as does a finished one's.
    subprocess.run([sys.executable, "-c", _BURN], check=True)
    assert _children_cpu_s() - before >= 0.6 - _TICK
    assert process_tree_cpu_s(2**22 + 12345) == 0.0  # no such process


def test_postgres_has_its_own_group_only_where_it_runs() -> None:
    row = {"tps": 100.0, "client_cpu_pct": 10.0, "server_cpu_pct": {"postgres": 50.0}}
    assert cpu_ms_per_txn(row)["PostgreSQL"] == pytest.approx(5.0)
    assert "PostgreSQL" not in cpu_ms_per_txn({**row, "server_cpu_pct": {"bank-a": 5.0}})
