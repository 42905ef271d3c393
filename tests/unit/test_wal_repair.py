"""Start-up repair of a torn tail, and corruption that must stop start-up."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from accord.coordinator.wal import WAL, WalCorruptionError, WalRecord
from tests.unit.test_wal_helpers import (
    RTYPE,
    DiskRecord,
    copy_dir,
    flip_bit,
    payloads,
    read_records,
    reopen,
    segments,
    write_log,
    zero_range,
)

SEG = 4096


@pytest.fixture
async def pristine(tmp_path: Path) -> tuple[Path, list[bytes], list[DiskRecord]]:
    """A closed log of small records over a few 4 KiB segments, the last holding >= 4."""
    data = payloads(200, seed=11)
    src = tmp_path / "pristine"
    await write_log(src, data, segment_size=SEG)
    recs = read_records(src)
    assert len(segments(src)) >= 3
    assert sum(r.segment == recs[-1].segment for r in recs) >= 4
    return src, data, recs


def expected(data: list[bytes], n: int) -> list[WalRecord]:
    return [WalRecord(i + 1, RTYPE, p) for i, p in enumerate(data[:n])]


async def check_repaired(work: Path, data: list[bytes], keep: int) -> None:
    """Reopen returns exactly the first ``keep`` records; appending and reopening work."""
    wal, recovered = await WAL.open(work, segment_size=SEG)
    assert recovered.records == expected(data, keep)
    assert wal.last_lsn == keep
    assert await wal.append(RTYPE, b"after repair", sync=True) == keep + 1
    await wal.close()
    records, repaired = await reopen(work, segment_size=SEG)
    assert records == [*expected(data, keep), WalRecord(keep + 1, RTYPE, b"after repair")]
    assert repaired == []
    read_records(work)  # the repaired file is a well-formed log again


async def test_truncate_at_every_offset_of_the_last_three_records(
    pristine: tuple[Path, list[bytes], list[DiskRecord]], tmp_path: Path
) -> None:
    src, data, recs = pristine
    work = tmp_path / "work"
    cases = 0
    for rec in recs[-3:]:
        index = rec.lsn - 1  # records before this one survive
        original = rec.segment.read_bytes()
        for cut in range(rec.offset, rec.offset + rec.size):
            copy_dir(src, work)
            os.truncate(work / rec.segment.name, cut)
            await check_repaired(work, data, index)
            if original[rec.offset : cut].strip(b"\0"):  # else: only zeros left, a clean end
                assert list((work / "damaged").iterdir())
            cases += 1
    # Cuts in the preallocated tail after the last record lose nothing.
    last = recs[-1]
    for cut in range(last.offset + last.size, SEG, 61):
        copy_dir(src, work)
        os.truncate(work / last.segment.name, cut)
        await check_repaired(work, data, len(data))
        cases += 1
    assert cases > 100


async def test_zeroed_tail_is_repaired(
    pristine: tuple[Path, list[bytes], list[DiskRecord]], tmp_path: Path
) -> None:
    src, data, recs = pristine
    work = tmp_path / "work"
    for rec in recs[-3:]:
        original = rec.segment.read_bytes()
        for start in range(rec.offset, rec.offset + rec.size):
            copy_dir(src, work)
            zero_range(work / rec.segment.name, start, SEG)
            wal, recovered = await WAL.open(work, segment_size=SEG)
            await wal.close()
            intact = start >= rec.offset + 32 + len(rec.payload)  # only padding zeroed
            assert recovered.records == expected(data, rec.lsn - (not intact))
            left = original[rec.offset : start].strip(b"\0")  # nothing left: a clean end
            assert bool(recovered.repaired) == (bool(left) and not intact)
    # The repair note says what happened, and the damaged bytes were kept.
    copy_dir(src, work)
    rec = next(r for r in reversed(recs) if len(r.payload) >= 2)
    zero_range(work / rec.segment.name, rec.offset + 33, SEG)
    records, repaired = await reopen(work, segment_size=SEG)
    assert records == expected(data, rec.lsn - 1)
    assert len(repaired) == 1
    assert f"torn tail in segment {rec.segment.name} at offset {rec.offset}" in repaired[0]
    saved = work / "damaged" / f"{rec.segment.name}.{rec.offset}.bin"
    original = rec.segment.read_bytes()
    assert saved.read_bytes() == original[rec.offset : rec.offset + 33] + bytes(rec.size - 33)
    await check_repaired(work, data, rec.lsn - 1)


def _middle(recs: list[DiskRecord], *, last_segment: bool) -> DiskRecord:
    seg = recs[-1].segment if last_segment else recs[0].segment
    mine = [r for r in recs if r.segment == seg]
    return mine[len(mine) // 2]


@pytest.mark.parametrize("last_segment", [True, False], ids=["last-segment", "earlier-segment"])
@pytest.mark.parametrize(
    "field,delta",
    [("payload", 32), ("crc", 4), ("length", 0), ("length-high", 2), ("lsn", 8), ("rtype", 24)],
)
async def test_flipped_bit_before_the_tail_stops_startup(
    pristine: tuple[Path, list[bytes], list[DiskRecord]],
    tmp_path: Path,
    last_segment: bool,
    field: str,
    delta: int,
) -> None:
    src, _data, recs = pristine
    rec = _middle(recs, last_segment=last_segment)
    if field == "payload":
        rec = next(r for r in recs[recs.index(rec) :] if len(r.payload) > 0)
    work = copy_dir(src, tmp_path / "work")
    flip_bit(work / rec.segment.name, rec.offset + delta, bit=5 if field == "length-high" else 0)
    before = sorted((p.name, p.read_bytes()) for p in work.iterdir() if p.is_file())
    with pytest.raises(WalCorruptionError) as info:
        await WAL.open(work, segment_size=SEG)
    msg = str(info.value)
    assert msg.startswith("wal: ")
    assert rec.segment.name in msg and f"at offset {rec.offset}" in msg, msg
    # Nothing was "repaired" on the way, and the lock was released.
    after = sorted((p.name, p.read_bytes()) for p in work.iterdir() if p.is_file())
    assert [a for a in after if a[0] != "LOCK"] == [b for b in before if b[0] != "LOCK"]
    assert not (work / "damaged").exists()
    with pytest.raises(WalCorruptionError):
        await WAL.open(work, segment_size=SEG)


async def test_flipped_bit_between_unsynced_records_is_corruption(tmp_path: Path) -> None:
    """Without a proving witness (all written before any fsync), a bit flip still does not
    look like a torn write while valid records follow."""
    wal, _ = await WAL.open(tmp_path, segment_size=1 << 16)
    done = [wal.submit(RTYPE, p, sync=False)[1] for p in payloads(30, seed=5)]
    await asyncio.gather(*done)
    await wal.close()
    recs = read_records(tmp_path)
    assert all(r.synced_lsn == 0 for r in recs)
    rec = recs[15]
    flip_bit(rec.segment, rec.offset + 32 + len(rec.payload) // 2, bit=3)
    with pytest.raises(WalCorruptionError, match=f"at offset {rec.offset}"):
        await WAL.open(tmp_path, segment_size=1 << 16)


async def test_lost_sector_in_an_unsynced_batch_is_a_torn_tail(tmp_path: Path) -> None:
    """A power cut can persist a later page of an unsynced batch but not an earlier one:
    valid records after a zeroed hole, none of them ever acknowledged as durable."""
    data = payloads(20, seed=3)
    wal, _ = await WAL.open(tmp_path, segment_size=1 << 16)
    for p in data[:5]:
        await wal.append(RTYPE, p, sync=True)
    big = [bytes([i + 1]) * 300 for i in range(10)]  # one batch, written before its sync
    await asyncio.gather(*(wal.append(RTYPE, p, sync=True) for p in big))
    await wal.close()
    recs = read_records(tmp_path)
    sector = (recs[6].offset // 512 + 1) * 512  # a sector inside the unsynced batch
    hole = next(r for r in recs if r.offset <= sector < r.offset + r.size)
    assert hole.lsn >= 7 and recs[-1].offset > sector + 512  # valid records follow it
    zero_range(hole.segment, sector, sector + 512)
    records, repaired = await reopen(tmp_path, segment_size=1 << 16)
    assert [r.lsn for r in records] == list(range(1, hole.lsn))
    assert len(repaired) == 1 and "torn tail" in repaired[0]


async def test_lost_sector_before_synced_records_is_corruption(
    pristine: tuple[Path, list[bytes], list[DiskRecord]], tmp_path: Path
) -> None:
    """The same hole, but later records say the damaged one had been synced."""
    src, _data, recs = pristine
    work = copy_dir(src, tmp_path / "work")
    mine = [r for r in recs if r.segment == recs[-1].segment]
    rec = mine[1]
    zero_range(work / rec.segment.name, rec.offset, rec.offset + rec.size)
    with pytest.raises(WalCorruptionError, match=f"at offset {rec.offset}.*synced"):
        await WAL.open(work, segment_size=SEG)


async def test_missing_middle_segment_is_corruption(
    pristine: tuple[Path, list[bytes], list[DiskRecord]], tmp_path: Path
) -> None:
    src, _data, _recs = pristine
    work = copy_dir(src, tmp_path / "work")
    segs = segments(work)
    segs[1].unlink()
    with pytest.raises(WalCorruptionError, match=f"segment {segs[0].name} ends at offset"):
        await WAL.open(work, segment_size=SEG)
    work = copy_dir(src, tmp_path / "work")
    segments(work)[0].unlink()
    with pytest.raises(WalCorruptionError, match="no checkpoint covers"):
        await WAL.open(work, segment_size=SEG)


async def test_bad_segment_header_is_corruption(
    pristine: tuple[Path, list[bytes], list[DiskRecord]], tmp_path: Path
) -> None:
    src, _data, _recs = pristine
    work = copy_dir(src, tmp_path / "work")
    last = segments(work)[-1]
    flip_bit(last, 17)
    with pytest.raises(WalCorruptionError, match=f"segment {last.name} at offset 0"):
        await WAL.open(work, segment_size=SEG)


@pytest.mark.parametrize("delta", [0, 4, 8, 16, 24, 28, 32, 40])
async def test_flipped_bit_in_the_last_record_stops_startup(tmp_path: Path, delta: int) -> None:
    """Regression (found by tests/unit/test_wal_fuzz.py): the last record, acknowledged
    and then damaged by a flipped bit, used to be taken for a torn write and dropped.
    It is complete, so no interrupted write left it: start-up stops, nothing changed."""
    src = tmp_path / "log"
    await write_log(src, [*payloads(30, seed=5), b"the last record, acknowledged"])
    rec = read_records(src)[-1]
    work = copy_dir(src, tmp_path / "work")
    flip_bit(work / rec.segment.name, rec.offset + delta, bit=2)
    before = sorted((p.name, p.read_bytes()) for p in work.iterdir() if p.is_file())
    with pytest.raises(WalCorruptionError) as info:
        await WAL.open(work, segment_size=SEG)
    assert f"segment {rec.segment.name} at offset {rec.offset}" in str(info.value)
    after = sorted((p.name, p.read_bytes()) for p in work.iterdir() if p.is_file())
    assert [a for a in after if a[0] != "LOCK"] == [b for b in before if b[0] != "LOCK"]
