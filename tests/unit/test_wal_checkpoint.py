"""Checkpoints: image + later records at open, old segments deleted, disk use bounded."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from accord.coordinator.wal import WAL, WalCorruptionError, WalError, WalRecord
from accord.coordinator.wal._checkpoint import write_checkpoint_file
from tests.unit.test_wal_helpers import RTYPE, dir_usage, read_records, segments

SEG = 4096


def names(directory: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in directory.glob(pattern))


async def test_checkpoint_then_reopen(tmp_path: Path) -> None:
    wal, _ = await WAL.open(tmp_path, segment_size=SEG)
    for i in range(200):
        await wal.append(RTYPE, b"record %03d " % i * 4, sync=i % 10 == 0)
    before = segments(tmp_path)
    assert len(before) >= 4
    await wal.checkpoint(b"image@140", 140)
    after = segments(tmp_path)
    assert len(after) < len(before)
    # What is left starts at or before lsn 141: nothing needed was deleted.
    assert int(after[0].stem, 16) <= 141 < int(after[1].stem, 16)
    assert names(tmp_path, "*.ckpt") == ["checkpoint-000000000000008c.ckpt"]
    assert wal.stats.checkpoints == 1 and wal.stats.segments_deleted == len(before) - len(after)
    for i in range(20):
        await wal.append(RTYPE, b"late %d" % i, sync=True)
    await wal.close()

    wal, recovered = await WAL.open(tmp_path, segment_size=SEG)
    assert recovered.checkpoint == b"image@140" and recovered.checkpoint_lsn == 140
    lsns = [r.lsn for r in recovered.records]
    # 141..200, the CHECKPOINT record (201) left out, then 202..221.
    assert lsns == [*range(141, 201), *range(202, 222)]
    assert recovered.records[-1] == WalRecord(221, RTYPE, b"late 19")
    assert wal.last_lsn == 221
    await wal.close()
    read_records(tmp_path)


async def test_disk_use_stays_bounded(tmp_path: Path) -> None:
    wal, _ = await WAL.open(tmp_path, segment_size=SEG)
    peak_files, peak_bytes = 0, 0
    for rnd in range(50):
        for i in range(60):  # about a segment and a half per round
            wal.submit(RTYPE, b"round %d record %d" % (rnd, i) * 3, sync=False)
        await wal.append(RTYPE, b"end of round %d" % rnd, sync=True)
        await wal.checkpoint(b"state after round %d" % rnd, wal.last_lsn)
        files, size = dir_usage(tmp_path)
        peak_files, peak_bytes = max(peak_files, len(files)), max(peak_bytes, size)
    await wal.close()
    # Segments: the one with the CHECKPOINT record and maybe its predecessor; + spare,
    # LOCK, one checkpoint file.
    assert peak_files <= 6, dir_usage(tmp_path)
    assert peak_bytes <= 5 * SEG
    wal, recovered = await WAL.open(tmp_path, segment_size=SEG)
    assert recovered.checkpoint == b"state after round 49"
    assert recovered.records == []
    assert recovered.checkpoint_lsn == wal.last_lsn - 1
    await wal.close()


async def test_crash_between_checkpoint_file_and_record(tmp_path: Path) -> None:
    """A checkpoint file whose CHECKPOINT record never became durable is ignored."""
    wal, _ = await WAL.open(tmp_path, segment_size=SEG)
    for i in range(50):
        await wal.append(RTYPE, b"%d" % i, sync=True)
    await wal.checkpoint(b"real", 20)
    await wal.close()
    write_checkpoint_file(tmp_path, 40, b"orphan")  # as if the process died right after
    wal, recovered = await WAL.open(tmp_path, segment_size=SEG)
    assert recovered.checkpoint == b"real" and recovered.checkpoint_lsn == 20
    assert [r.lsn for r in recovered.records] == list(range(21, 51))
    assert any("checkpoint-0000000000000028.ckpt" in n for n in recovered.repaired)
    assert names(tmp_path, "*.ckpt") == ["checkpoint-0000000000000014.ckpt"]
    # A later checkpoint at that same lsn still works.
    await wal.checkpoint(b"second", 40)
    await wal.close()
    wal, recovered = await WAL.open(tmp_path, segment_size=SEG)
    assert recovered.checkpoint == b"second" and recovered.checkpoint_lsn == 40
    await wal.close()


async def test_leftover_segments_of_an_interrupted_cleanup(tmp_path: Path) -> None:
    """Unlinks that were not durable: old segments reappear, even with a gap."""
    wal, _ = await WAL.open(tmp_path, segment_size=SEG)
    for i in range(300):
        await wal.append(RTYPE, b"payload %d" % i * 3, sync=False)
    saved = tmp_path.parent / "saved"
    shutil.copytree(tmp_path, saved)
    await wal.checkpoint(b"img", 280)
    await wal.close()
    old = sorted(saved.glob("*.wal"))
    assert len(old) >= 4
    shutil.copy(old[0], tmp_path)  # the oldest is back, its successor is not: a gap
    wal, recovered = await WAL.open(tmp_path, segment_size=SEG)
    assert recovered.checkpoint == b"img"
    assert [r.lsn for r in recovered.records] == list(range(281, 301))
    assert any("interrupted checkpoint" in n for n in recovered.repaired)
    assert old[0].name not in names(tmp_path, "*.wal")
    await wal.close()
    for p in old[:-1]:  # all of them back: contiguous, covered by the checkpoint
        shutil.copy(p, tmp_path)
    wal, recovered = await WAL.open(tmp_path, segment_size=SEG)
    assert [r.lsn for r in recovered.records] == list(range(281, 301))
    assert recovered.repaired
    await wal.close()


async def test_checkpoint_file_damage_is_corruption(tmp_path: Path) -> None:
    wal, _ = await WAL.open(tmp_path, segment_size=SEG)
    await wal.append(RTYPE, b"a", sync=True)
    await wal.checkpoint(b"image", 1)
    await wal.close()
    ckpt = tmp_path / "checkpoint-0000000000000001.ckpt"
    data = bytearray(ckpt.read_bytes())
    data[-1] ^= 1
    ckpt.write_bytes(bytes(data))
    with pytest.raises(WalCorruptionError, match=re.escape("checkpoint-0000000000000001.ckpt")):
        await WAL.open(tmp_path, segment_size=SEG)
    ckpt.unlink()
    with pytest.raises(WalCorruptionError, match="missing"):
        await WAL.open(tmp_path, segment_size=SEG)


async def test_checkpoint_arguments(tmp_path: Path) -> None:
    wal, _ = await WAL.open(tmp_path, segment_size=SEG)
    for i in range(5):
        await wal.append(RTYPE, b"%d" % i, sync=True)
    await wal.checkpoint(b"at 3", 3)
    with pytest.raises(WalError, match="older"):
        await wal.checkpoint(b"at 2", 2)
    await wal.checkpoint(b"at 3 again", 3)  # same lsn: nothing new to record
    with pytest.raises(WalError, match="outside"):
        await wal.checkpoint(b"future", wal.last_lsn + 1)
    await wal.close()
    wal, recovered = await WAL.open(tmp_path, segment_size=SEG)
    assert recovered.checkpoint == b"at 3"
    assert [r.lsn for r in recovered.records] == [4, 5]
    await wal.close()
