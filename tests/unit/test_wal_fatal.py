"""Fail-stop: a failed fdatasync or write is fatal and never reported as success."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from accord.coordinator._failpoints import Failpoints
from accord.coordinator.wal import WAL, WalFatalError
from tests.unit.test_wal_helpers import RTYPE


async def test_failed_fsync_is_fatal(tmp_path: Path) -> None:
    fatal: list[BaseException] = []
    wal, _ = await WAL.open(
        tmp_path, failpoints=Failpoints({"wal_fsync": "error"}), on_fatal=fatal.append
    )
    results = await asyncio.gather(
        *(wal.append(RTYPE, b"r%d" % i, sync=True) for i in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, WalFatalError) for r in results), results
    assert len(fatal) == 1 and isinstance(fatal[0], WalFatalError)
    assert "fdatasync" in str(fatal[0]) and str(fatal[0]).startswith("wal: ")
    assert wal.fatal
    with pytest.raises(WalFatalError):
        wal.submit(RTYPE, b"later", sync=False)
    with pytest.raises(WalFatalError):
        await wal.append(RTYPE, b"later", sync=True)
    with pytest.raises(WalFatalError):
        await wal.checkpoint(b"image", 0)
    assert len(fatal) == 1
    await wal.close()
    await wal.close()
    # The directory is usable again by a new owner (whatever the failed batch left).
    wal, _ = await WAL.open(tmp_path)
    await wal.append(RTYPE, b"fresh", sync=True)
    await wal.close()


async def test_queued_waiters_fail_too(tmp_path: Path) -> None:
    """Records queued behind the failing batch never succeed, sync or not."""
    fatal: list[BaseException] = []
    wal, _ = await WAL.open(
        tmp_path, failpoints=Failpoints({"wal_fsync": "error"}), on_fatal=fatal.append
    )
    _, first = wal.submit(RTYPE, b"first", sync=True)
    await asyncio.sleep(0)  # the writer takes `first` alone
    later = [wal.submit(RTYPE, b"q%d" % i, sync=i % 2 == 0)[1] for i in range(10)]
    with pytest.raises(WalFatalError):
        await first
    for f in later:
        with pytest.raises(WalFatalError):
            await f
    assert len(fatal) == 1
    await wal.close()


async def test_failed_write_is_fatal(tmp_path: Path) -> None:
    fatal: list[BaseException] = []
    wal, _ = await WAL.open(
        tmp_path, failpoints=Failpoints({"wal_before_write": "error"}), on_fatal=fatal.append
    )
    with pytest.raises(WalFatalError, match="write to segment"):
        await wal.append(RTYPE, b"never written", sync=False)
    assert len(fatal) == 1
    await wal.close()
    wal, recovered = await WAL.open(tmp_path)
    assert recovered.records == []
    await wal.close()


async def test_slow_fsync_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    wal, _ = await WAL.open(tmp_path, slow_fsync_warn_s=0.0)
    with caplog.at_level("WARNING", logger="accord.coordinator.wal"):
        await wal.append(RTYPE, b"x", sync=True)
    await wal.close()
    assert any("slow fdatasync" in r.getMessage() for r in caplog.records)
