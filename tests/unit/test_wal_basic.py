"""Round trip, LSNs, group commit, sync=False, limits, lock, close."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from accord.coordinator.wal import (
    MAX_PAYLOAD,
    WAL,
    WalError,
    WalLockedError,
    WalRecord,
)
from tests.unit.test_wal_helpers import RTYPE, read_records, segments


async def test_round_trip_across_segments(tmp_path: Path) -> None:
    rnd = random.Random(7)
    data = [rnd.randbytes(rnd.randint(0, 600)) for _ in range(300)]
    wal, recovered = await WAL.open(tmp_path, segment_size=4096)
    assert recovered.records == [] and recovered.checkpoint is None
    assert recovered.checkpoint_lsn == 0 and recovered.repaired == []
    lsns: list[int] = []
    for i in range(0, len(data), 25):  # bursts: several batches, mixed sync
        chunk = data[i : i + 25]
        lsns += await asyncio.gather(
            *(wal.append(RTYPE + j % 3, p, sync=j % 2 == 0) for j, p in enumerate(chunk))
        )
    assert lsns == list(range(1, 301))
    assert wal.last_lsn == 300
    await wal.close()
    assert len(segments(tmp_path)) > 5

    on_disk = read_records(tmp_path)  # independent check of format and CRC chain
    assert [r.lsn for r in on_disk] == lsns

    wal, recovered = await WAL.open(tmp_path, segment_size=4096)
    expected = [WalRecord(i + 1, RTYPE + (i % 25) % 3, p) for i, p in enumerate(data)]
    assert recovered.records == expected
    assert recovered.repaired == []
    assert wal.last_lsn == 300
    assert await wal.append(RTYPE, b"more", sync=True) == 301
    await wal.close()
    wal, recovered = await WAL.open(tmp_path, segment_size=4096)
    assert recovered.records[-1] == WalRecord(301, RTYPE, b"more")
    await wal.close()
    read_records(tmp_path)


async def test_submit_assigns_lsn_synchronously(tmp_path: Path) -> None:
    wal, _ = await WAL.open(tmp_path)
    a, done_a = wal.submit(RTYPE, b"a", sync=False)
    b, done_b = wal.submit(RTYPE, b"b", sync=True)
    assert (a, b) == (1, 2) and wal.last_lsn == 2
    assert not done_a.done() and not done_b.done()
    await asyncio.gather(done_a, done_b)
    await wal.close()


async def test_group_commit_batches_fsyncs(tmp_path: Path) -> None:
    batches: list[tuple[int, float]] = []
    wal, _ = await WAL.open(tmp_path, on_sync=lambda n, s: batches.append((n, s)))
    lsns = await asyncio.gather(*(wal.append(RTYPE, b"x" * i, sync=True) for i in range(200)))
    assert sorted(lsns) == list(range(1, 201))
    stats = wal.stats
    assert stats.records == 200
    assert stats.syncs < 100, stats
    assert stats.max_batch > 1
    assert sum(n for n, _ in batches) == 200
    assert stats.fsync_total_s > 0 and stats.fsync_max_s > 0
    await wal.close()
    assert [r.lsn for r in read_records(tmp_path)] == list(range(1, 201))


async def test_sync_false_does_not_fsync(tmp_path: Path) -> None:
    wal, _ = await WAL.open(tmp_path)
    for i in range(10):
        await wal.append(RTYPE, b"lazy %d" % i, sync=False)
    assert wal.stats.syncs == 0
    assert wal.stats.records == 10
    await wal.append(RTYPE, b"eager", sync=True)
    assert wal.stats.syncs == 1
    await wal.close()
    wal, recovered = await WAL.open(tmp_path)
    assert [r.payload for r in recovered.records][-1] == b"eager"
    assert len(recovered.records) == 11
    await wal.close()


async def test_close_flushes_pending_and_is_idempotent(tmp_path: Path) -> None:
    wal, _ = await WAL.open(tmp_path)
    pending = [wal.submit(RTYPE, b"p%d" % i, sync=False)[1] for i in range(5)]
    await asyncio.gather(wal.close(), wal.close())
    await wal.close()
    assert all(f.done() and f.exception() is None for f in pending)
    with pytest.raises(WalError, match="closed"):
        wal.submit(RTYPE, b"late", sync=False)
    wal, recovered = await WAL.open(tmp_path)
    assert len(recovered.records) == 5
    await wal.close()


async def test_record_bigger_than_a_segment(tmp_path: Path) -> None:
    big = random.Random(3).randbytes(20_000)
    wal, _ = await WAL.open(tmp_path, segment_size=4096)
    await wal.append(RTYPE, b"small", sync=True)
    await wal.append(RTYPE, big, sync=True)
    await wal.append(RTYPE, big[:5000], sync=True)
    await wal.append(RTYPE, b"after", sync=True)
    await wal.close()
    wal, recovered = await WAL.open(tmp_path, segment_size=4096)
    assert [r.payload for r in recovered.records] == [b"small", big, big[:5000], b"after"]
    await wal.close()


async def test_limits(tmp_path: Path) -> None:
    wal, _ = await WAL.open(tmp_path)
    with pytest.raises(WalError, match="over the"):
        wal.submit(RTYPE, bytes(MAX_PAYLOAD + 1), sync=False)
    with pytest.raises(WalError, match="record type"):
        wal.submit(1, b"reserved", sync=False)
    assert wal.last_lsn == 0  # refused submissions take no LSN
    with pytest.raises(WalError, match="checkpoint lsn"):
        await wal.checkpoint(b"img", 5)
    await wal.close()


async def test_second_open_is_locked(tmp_path: Path) -> None:
    wal, _ = await WAL.open(tmp_path)
    with pytest.raises(WalLockedError, match="locked"):
        await WAL.open(tmp_path)
    await wal.append(RTYPE, b"still mine", sync=True)  # the failed open changed nothing
    await wal.close()
    wal, recovered = await WAL.open(tmp_path)  # released by close
    assert [r.payload for r in recovered.records] == [b"still mine"]
    await wal.close()


async def test_directory_is_created_and_temp_files_removed(tmp_path: Path) -> None:
    d = tmp_path / "a" / "b"
    wal, _ = await WAL.open(d, segment_size=4096)
    await wal.append(RTYPE, b"x", sync=True)
    await wal.close()
    (d / "checkpoint-0000000000000009.ckpt.tmp").write_bytes(b"half")
    wal, _ = await WAL.open(d, segment_size=4096)
    await wal.close()
    assert sorted(p.name for p in d.iterdir()) == ["0000000000000001.wal", "LOCK"]
