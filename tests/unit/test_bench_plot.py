"""The README's benchmark figure: CPU per transaction by process group, and the PNG."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.plot import cpu_ms_per_txn, plot, top_results


def _result(name: str, concurrency: int, tps: float, **cpu: float) -> dict[str, object]:
    return {
        "name": name,
        "concurrency": concurrency,
        "tps": tps,
        "client_cpu_pct": cpu.pop("client", 0.0),
        "kernel_cpu_pct": cpu.pop("kernel", 0.0),
        "server_cpu_pct": cpu,
    }


def test_cpu_per_transaction_is_grouped_by_process() -> None:
    r = _result("2pc", 64, 200.0, client=20.0, kernel=2.0, coordinator=80.0, **{"bank-a": 40.0})
    got = cpu_ms_per_txn(r)
    # 80 % of a core at 200 tx/s = 4 ms of coordinator CPU per transaction.
    assert got == pytest.approx(
        {
            "load generator": 1.0,
            "coordinator": 4.0,
            "participants": 2.0,
            "etcd / sink / kernel": 0.1,
        }
    )
    assert set(cpu_ms_per_txn(_result("x", 1, 0.0, coordinator=50.0)).values()) == {0.0}


def test_only_the_highest_concurrency_is_plotted(tmp_path: Path) -> None:
    report = {
        "machine": {"cpu": "test", "cores": 2, "python": "3.11", "grpcio": "1", "date": "x"},
        "results": [
            _result("baseline-2pc", 1, 100.0, coordinator=30.0),
            _result("baseline-2pc", 64, 500.0, coordinator=80.0),
            _result("2pc", 1, 50.0, coordinator=30.0),
            _result("2pc", 64, 250.0, coordinator=80.0),
        ],
        "ratios": [
            {
                "name": "2pc/baseline-2pc",
                "concurrency": 64,
                "median": 0.5,
                "min": 0.45,
                "max": 0.55,
                "rounds": 3,
                "target": 0.85,
            },
            {
                "name": "saga/baseline-saga",
                "concurrency": 1,
                "median": 0.5,
                "min": 0.5,
                "max": 0.5,
                "rounds": 3,
            },
        ],
    }
    assert [(r["name"], r["concurrency"]) for r in top_results(report)] == [
        ("baseline-2pc", 64),
        ("2pc", 64),
    ]
    out = tmp_path / "fig.png"
    plot(report, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot({"results": []}, tmp_path / "empty.png")


def test_profile_samples_are_attributed_to_the_innermost_known_layer() -> None:
    from bench.profile import breakdown, classify

    loop = "Runner.run (asyncio/runners.py:118)"
    handler = "ParticipantServicer.Prepare (participants/_servicer.py:73)"
    grpc_server = "_handle_rpc (grpc/_cython/cygrpc.so)"
    assert classify([loop, grpc_server, handler]) == "participant SDK"
    assert classify([loop, "Engine.call_branch (coordinator/_engine.py:1)", grpc_server]) == "gRPC"
    assert classify([loop, grpc_server, "sendmsg (libc.so.6)"]) == "gRPC sendmsg"
    assert classify([loop, "epoll_wait (libc.so.6)"]) == "waiting (epoll)"
    assert classify([loop, "SegmentLog.sync (coordinator/wal/_segment.py:9)"]) == "WAL"
    assert classify([loop, "task_step (_asynciomodule.c:1)"]) == "event loop, other"
    collapsed = "\n".join(
        [
            f"{loop};{handler} 3",
            f"{loop};epoll_wait (libc.so.6) 1",
            "Thread.run (threading.py:982);fdatasync (libc.so.6) 5",  # not the main thread
        ]
    )
    layers, total = breakdown(collapsed)
    assert total == 4
    assert layers == {"participant SDK": 3, "waiting (epoll)": 1}
