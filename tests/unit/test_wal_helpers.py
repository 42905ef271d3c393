"""Helpers for the WAL tests: an independent reader of the documented file format, and
small utilities to build logs and damage them. (No tests here.)"""

from __future__ import annotations

import os
import random
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import crc32c

from accord.coordinator.wal import WAL, WalRecord

SEGMENT_HEADER = struct.Struct("<8sQIIII")
RECORD_HEADER = struct.Struct("<IIQQHHI")
RTYPE = 16


@dataclass(frozen=True)
class DiskRecord:
    segment: Path
    offset: int
    size: int
    lsn: int
    rtype: int
    payload: bytes
    synced_lsn: int


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.wal"))


def read_records(directory: Path) -> list[DiskRecord]:
    """Every record in every segment, checking the format as the package docs state it
    (header CRCs, LSN sequence, CRC chain across segments)."""
    out: list[DiskRecord] = []
    prev_crc: int | None = None
    expect: int | None = None
    for seg in segments(directory):
        data = seg.read_bytes()
        magic, first, seg_prev, version, _res, hcrc = SEGMENT_HEADER.unpack_from(data)
        assert magic == b"ACCWAL\x00\x01" and version == 1
        assert hcrc == crc32c.crc32c(data[:28])
        assert int(seg.stem, 16) == first
        if prev_crc is not None:
            assert seg_prev == prev_crc and first == expect
        crc, lsn, off = seg_prev, first, 32
        while off + 32 <= len(data) and data[off : off + 32] != bytes(32):
            length, rcrc, rlsn, synced, rtype, rmagic, rh = RECORD_HEADER.unpack_from(data, off)
            assert rmagic == 0xA5C3 and rh == crc32c.crc32c(data[off : off + 28])
            assert rlsn == lsn, (seg.name, off, rlsn, lsn)
            payload = data[off + 32 : off + 32 + length]
            fields = struct.pack("<IQQHH", length, rlsn, synced, rtype, 0xA5C3)
            assert rcrc == crc32c.crc32c(payload, crc32c.crc32c(fields, crc))
            size = 32 + (length + 7) // 8 * 8
            out.append(DiskRecord(seg, off, size, rlsn, rtype, payload, synced))
            crc, lsn, off = rcrc, lsn + 1, off + size
        assert not data[off:].strip(b"\0"), f"non-zero bytes after the end of {seg.name}"
        prev_crc, expect = crc, lsn
    return out


def dir_usage(directory: Path) -> tuple[list[str], int]:
    """(names, total bytes of the regular files) in ``directory``."""
    entries = list(os.scandir(directory))
    return sorted(e.name for e in entries), sum(e.stat().st_size for e in entries if e.is_file())


def payloads(n: int, *, seed: int = 1, max_len: int = 40) -> list[bytes]:
    rnd = random.Random(seed)
    # Non-zero bytes, so a flipped bit or a zeroed sector is never mistaken for data.
    return [bytes(rnd.randint(1, 255) for _ in range(rnd.randint(0, max_len))) for _ in range(n)]


async def write_log(
    directory: Path, data: list[bytes], *, segment_size: int = 4096, sync: bool = True
) -> None:
    """Append ``data`` one record at a time (each synced before the next is written)."""
    wal, _ = await WAL.open(directory, segment_size=segment_size)
    try:
        for p in data:
            await wal.append(RTYPE, p, sync=sync)
    finally:
        await wal.close()


async def reopen(directory: Path, *, segment_size: int = 4096) -> tuple[list[WalRecord], list[str]]:
    wal, recovered = await WAL.open(directory, segment_size=segment_size)
    await wal.close()
    return recovered.records, recovered.repaired


def copy_dir(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def zero_range(path: Path, start: int, end: int) -> None:
    with path.open("r+b") as f:
        f.seek(start)
        f.write(bytes(end - start))
