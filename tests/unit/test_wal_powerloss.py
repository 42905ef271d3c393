"""The power-loss simulation used by chaos runs: only what an fdatasync covered stays."""

from __future__ import annotations

from pathlib import Path

import pytest

from accord.coordinator.wal import SYNC_MARKER, WAL, WalError, drop_unsynced

SEGMENT = 64 * 1024


async def test_drop_unsynced_keeps_exactly_the_synced_records(tmp_path: Path) -> None:
    wal, _ = await WAL.open(tmp_path, segment_size=SEGMENT, sync_marker=True)
    payload = b"x" * 3000
    for _ in range(30):  # crosses segments: whole later segments go too
        _, done = wal.submit(16, payload, sync=True)
        await done
    synced = int((tmp_path / SYNC_MARKER).read_text())
    assert synced == 30
    for _ in range(5):
        _, done = wal.submit(16, b"unsynced", sync=False)
        await done  # written to the page cache only
    assert int((tmp_path / SYNC_MARKER).read_text()) == 30
    await wal.close()  # closing does not sync a write-only tail... (see below)
    # close() may sync; the marker says what was synced when the machine "lost power".
    (tmp_path / SYNC_MARKER).write_text(f"{synced:020d}\n")
    assert drop_unsynced(tmp_path) == 5
    wal, recovered = await WAL.open(tmp_path, segment_size=SEGMENT)
    try:
        assert [r.lsn for r in recovered.records] == list(range(1, 31))
        assert all(r.payload == payload for r in recovered.records)
        # The log goes on from there.
        lsn, done = wal.submit(16, b"after", sync=True)
        await done
        assert lsn == 31
    finally:
        await wal.close()


async def test_drop_unsynced_needs_the_marker(tmp_path: Path) -> None:
    wal, _ = await WAL.open(tmp_path, segment_size=SEGMENT)
    await wal.close()
    with pytest.raises(WalError, match="sync_marker"):
        drop_unsynced(tmp_path)
