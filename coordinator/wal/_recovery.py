"""Start-up: scan every segment, tell a torn tail from corruption, repair the tail.

The torn-vs-corrupt rule
------------------------
Scanning stops at the first record that does not verify (bad header check, unexpected
LSN, chained CRC mismatch, non-zero padding, or cut short by the end of the file). Zeroed
space after the last record (preallocation) is the normal end, not damage.

* In any segment but the last, a bad record is corruption: a segment is fdatasync'ed
  before the next one is created, so it can never hold a torn write. (One exception: a
  segment that a durable checkpoint makes unnecessary is a leftover of an interrupted
  checkpoint cleanup and is deleted.)
* In the last segment, the damage at offset X (expected LSN E) is **corruption** when

  1. a *proving witness* follows: a record header at an 8-aligned offset after X whose
     magic and header CRC verify, whose LSN is >= E and plausible for its distance from
     X, and whose ``synced_lsn`` is >= E. ``synced_lsn`` is the highest LSN covered by
     a completed fdatasync when that record was written, so it proves the bytes at X had
     already been made durable; they changed afterwards, which no crash can do; or
  2. any witness follows (even one written before E was synced) and the damage does
     not look like an interrupted write: a crash leaves whole 512-byte sectors either
     new or old (and old is zero: files are preallocated and repaired tails re-zeroed),
     so a torn record is cut short by the end of the file or has a piece that lies
     within one sector and is all zero. A flipped bit (in a length word too) is not; or
  3. nothing valid follows, and the damaged record is complete: the file holds bytes
     up to its end (its header's end if the header is bad, its payload's end otherwise),
     and no sector rule of 2 applies. A write that stopped part way, even at a byte
     rather than a sector, leaves zeros after the point where it stopped; a whole
     record that does not verify (a flipped bit) was written whole, may have been
     acknowledged, and is not dropped. (Issue 15's WAL fuzzing found that such a last
     record used to be taken for a torn write and dropped.)

  Otherwise the damage is a **torn tail**: it looks like an interrupted write and
  nothing after it proves it was ever durable. The damaged bytes (X up to the last
  non-zero byte) are copied to ``damaged/<segment>.<X>.bin``, the file is truncated at
  X and preallocated again, and appends continue at X.

Rule 2 keeps an ordinary power loss from stopping start-up: the page cache may write a
later page of an unsynced batch before an earlier one, leaving valid records after a
zeroed hole; they were never acknowledged as durable, so dropping them is correct.

Nothing on disk changes before every check has passed: a start-up that fails with
WalCorruptionError leaves the directory as it found it (except temp files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ._checkpoint import list_checkpoint_files, read_checkpoint_file, remove_checkpoints_except
from ._errors import WalCorruptionError
from ._files import TMP_SUFFIX, fsync_dir, write_file_durably
from ._format import (
    ALIGN,
    FIRST_USER_RTYPE,
    MAX_PAYLOAD,
    RECORD_HEADER_SIZE,
    RECORD_MAGIC_BYTES,
    RECORD_MAGIC_OFFSET,
    RTYPE_CHECKPOINT,
    SECTOR,
    SEGMENT_HEADER_SIZE,
    ZERO_RECORD_HEADER,
    CheckpointRef,
    chained_crc,
    decode_checkpoint_record,
    decode_record_header,
    decode_segment_header,
    parse_segment_name,
)
from ._segment import prune_segments
from ._types import WalRecord

DAMAGED_DIR = "damaged"


@dataclass(slots=True)
class Recovery:
    """What the scan found, and where appends continue."""

    records: list[WalRecord]
    checkpoint: bytes | None
    checkpoint_lsn: int
    notes: list[str]
    segments: list[tuple[int, Path]]
    """Remaining segments (first LSN, path), oldest first; empty for a new log."""
    tail_offset: int
    tail_capacity: int
    crc: int
    """Chained CRC the next record starts from."""
    next_lsn: int


@dataclass(slots=True)
class _Record:
    lsn: int
    rtype: int
    payload: bytes
    offset: int


@dataclass(slots=True)
class _Fault:
    offset: int
    reason: str
    end: int
    """End of the damaged record as far as can be told (header only if it is bad)."""
    cut: bool
    """The file ends inside the record."""
    header_ok: bool


@dataclass(slots=True)
class _Witness:
    offset: int
    lsn: int
    synced_lsn: int


@dataclass(slots=True)
class _Scan:
    path: Path
    first_lsn: int
    prev_crc: int
    size: int
    records: list[_Record]
    end: int
    """Offset just past the last good record."""
    last_crc: int
    fault: _Fault | None
    nonzero_end: int
    """Offset just past the last non-zero byte of the file."""
    data: bytes

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def next_lsn(self) -> int:
        return self.first_lsn + len(self.records)


def recover(directory: Path, segment_size: int) -> Recovery:
    notes: list[str] = []
    found = sorted(
        (lsn, path)
        for path in directory.iterdir()
        if (lsn := parse_segment_name(path.name)) is not None
    )
    if not found:
        if ckpts := list_checkpoint_files(directory):
            names = ", ".join(sorted(p.name for p in ckpts.values()))
            raise WalCorruptionError(
                f"wal: {directory} holds checkpoint files ({names}) but no segments: "
                "the log is missing"
            )
        _remove_temp_files(directory)
        return Recovery([], None, 0, notes, [], 0, 0, 0, 1)

    scans: list[_Scan] = []
    for i, (lsn, path) in enumerate(found):
        scan = _scan_segment(path, lsn)
        if i < len(found) - 1:
            scan.data = b""  # only the last segment's bytes are needed later
        scans.append(scan)
    last = scans[-1]
    if last.fault is not None:
        _check_torn(last, last.fault)

    # The final run: the longest suffix of segments that chain into each other.
    start = 0
    first_break: int | None = None
    for k in range(len(scans) - 1):
        if not _linked(scans[k], scans[k + 1]):
            start = k + 1
            if first_break is None:
                first_break = k
    run = scans[start:]

    ref = _newest_checkpoint(run)
    ckpt_lsn = ref.lsn if ref is not None else 0
    if run[0].first_lsn > ckpt_lsn + 1:
        if first_break is not None:
            raise _break_error(scans[first_break], scans[first_break + 1])
        raise WalCorruptionError(
            f"wal: the log starts at lsn {run[0].first_lsn} (segment {run[0].name}) but no "
            f"checkpoint covers the records before it (checkpoint lsn {ckpt_lsn}): "
            "segments are missing"
        )
    image = read_checkpoint_file(directory, ref) if ref is not None else None

    # Every check passed; only now is anything on disk changed.
    capacity = _repair_tail(directory, last, segment_size, notes)
    for scan in scans[:start]:
        scan.path.unlink()
        notes.append(
            f"wal: removed segment {scan.name}, left over from an interrupted checkpoint "
            f"cleanup (all its records are covered by checkpoint lsn {ckpt_lsn})"
        )
    segments = [(s.first_lsn, s.path) for s in run]
    for path in prune_segments(segments, ckpt_lsn):
        notes.append(f"wal: removed segment {path.name}, covered by checkpoint lsn {ckpt_lsn}")
    for name in remove_checkpoints_except(directory, ref.lsn if ref is not None else None):
        notes.append(f"wal: removed checkpoint file {name}, not the live checkpoint")
    _remove_temp_files(directory)
    fsync_dir(directory)

    records = [
        WalRecord(r.lsn, r.rtype, r.payload)
        for s in run
        for r in s.records
        if r.lsn > ckpt_lsn and r.rtype >= FIRST_USER_RTYPE
    ]
    return Recovery(
        records=records,
        checkpoint=image,
        checkpoint_lsn=ckpt_lsn,
        notes=notes,
        segments=segments,
        tail_offset=last.end,
        tail_capacity=capacity,
        crc=last.last_crc,
        next_lsn=last.next_lsn,
    )


# --- scanning -------------------------------------------------------------------------


def _scan_segment(path: Path, name_lsn: int) -> _Scan:
    data = path.read_bytes()
    header = decode_segment_header(data)
    if isinstance(header, str):
        raise WalCorruptionError(f"wal: {header} in segment {path.name} at offset 0")
    if header.first_lsn != name_lsn:
        raise WalCorruptionError(
            f"wal: segment {path.name} at offset 0: header says first lsn "
            f"{header.first_lsn}, the name says {name_lsn}"
        )
    nonzero_end = len(data.rstrip(b"\0"))
    records: list[_Record] = []
    crc = header.prev_crc
    expect = header.first_lsn
    off = SEGMENT_HEADER_SIZE
    fault: _Fault | None = None
    while off < nonzero_end:  # all zero (or end of file) from here on: the normal end
        fault = _check_record(data, off, expect, crc)
        if fault is not None:
            break
        rec = decode_record_header(data, off)
        assert rec is not None  # _check_record verified it
        payload = data[off + RECORD_HEADER_SIZE : off + RECORD_HEADER_SIZE + rec.length]
        records.append(_Record(rec.lsn, rec.rtype, payload, off))
        crc = rec.crc
        expect += 1
        off += rec.size
    return _Scan(
        path=path,
        first_lsn=header.first_lsn,
        prev_crc=header.prev_crc,
        size=len(data),
        records=records,
        end=off,
        last_crc=crc,
        fault=fault,
        nonzero_end=nonzero_end,
        data=data,
    )


def _check_record(data: bytes, off: int, expect: int, prev_crc: int) -> _Fault | None:
    """Why the record at ``off`` is bad, or None if it verifies."""
    if off + RECORD_HEADER_SIZE > len(data):
        return _Fault(off, "record header cut short by the end of the file", len(data), True, False)
    hdr_end = off + RECORD_HEADER_SIZE
    rec = decode_record_header(data, off)
    if rec is None:
        reason = (
            "zeroed record header"
            if data[off:hdr_end] == ZERO_RECORD_HEADER
            else "bad record header (header checksum mismatch)"
        )
        return _Fault(off, reason, hdr_end, False, False)
    if rec.length > MAX_PAYLOAD:
        return _Fault(off, f"record length {rec.length} over the limit", hdr_end, False, False)
    end = off + rec.size
    if rec.lsn != expect:
        return _Fault(off, f"unexpected lsn {rec.lsn} (expected {expect})", end, False, True)
    if end > len(data):
        return _Fault(off, "record cut short by the end of the file", end, True, True)
    payload_end = hdr_end + rec.length
    if chained_crc(rec, memoryview(data)[hdr_end:payload_end], prev_crc) != rec.crc:
        return _Fault(off, "crc mismatch", end, False, True)
    if data.count(0, payload_end, end) != end - payload_end:
        return _Fault(off, "non-zero padding", end, False, True)
    return None


def _linked(a: _Scan, b: _Scan) -> bool:
    return a.fault is None and b.first_lsn == a.next_lsn and b.prev_crc == a.last_crc


def _break_error(a: _Scan, b: _Scan) -> WalCorruptionError:
    if a.fault is not None:
        return WalCorruptionError(
            f"wal: {a.fault.reason} in segment {a.name} at offset {a.fault.offset}"
        )
    if b.first_lsn != a.next_lsn:
        return WalCorruptionError(
            f"wal: segment {a.name} ends at offset {a.end} with lsn {a.next_lsn - 1} but "
            f"the next segment {b.name} starts at lsn {b.first_lsn}: records are missing"
        )
    return WalCorruptionError(
        f"wal: crc chain broken between segment {a.name} (ends at offset {a.end}, crc "
        f"{a.last_crc:#010x}) and segment {b.name} at offset 0 (prev crc {b.prev_crc:#010x})"
    )


def _newest_checkpoint(run: list[_Scan]) -> CheckpointRef | None:
    for scan in reversed(run):
        for rec in reversed(scan.records):
            if rec.rtype != RTYPE_CHECKPOINT:
                continue
            ref = decode_checkpoint_record(rec.payload)
            if ref is None or ref.lsn >= rec.lsn:
                raise WalCorruptionError(
                    f"wal: malformed CHECKPOINT record (lsn {rec.lsn}) in segment "
                    f"{scan.name} at offset {rec.offset}"
                )
            return ref
    return None


# --- torn or corrupt ------------------------------------------------------------------


def _check_torn(scan: _Scan, fault: _Fault) -> None:
    """Raise WalCorruptionError unless the damage in the last segment is a torn tail."""
    expect = scan.next_lsn
    search_from = fault.end if fault.header_ok else fault.offset + ALIGN
    first, proving = _find_witness(scan.data, search_from, scan.nonzero_end, fault.offset, expect)
    where = f"{fault.reason} in segment {scan.name} at offset {fault.offset}"
    if proving is not None:
        raise WalCorruptionError(
            f"wal: {where}: not a torn tail, the record at offset {proving.offset} "
            f"(lsn {proving.lsn}) was written after lsn {expect} had been synced"
        )
    if _looks_torn(scan.data, fault):
        return
    if first is not None:
        raise WalCorruptionError(
            f"wal: {where}: not a torn tail, a valid record follows at offset "
            f"{first.offset} (lsn {first.lsn}) and the damage is not an interrupted write"
        )
    if not _stops_short(scan.data, fault, scan.nonzero_end):
        # The last record, whole but wrong (a flipped bit): no write stopping part way
        # leaves it so, and it may have been acknowledged, so it is not dropped.
        raise WalCorruptionError(
            f"wal: {where}: not a torn tail, the record is complete (nothing after it is "
            "written, nothing of it is missing) but does not verify"
        )


def _find_witness(
    data: bytes, start: int, stop: int, damaged_at: int, expect: int
) -> tuple[_Witness | None, _Witness | None]:
    """(first witness, first proving witness) at aligned offsets in [start, stop)."""
    first: _Witness | None = None
    pos = start + RECORD_MAGIC_OFFSET
    limit = stop + RECORD_MAGIC_OFFSET + len(RECORD_MAGIC_BYTES)
    while True:
        hit = data.find(RECORD_MAGIC_BYTES, pos, limit)
        if hit < 0:
            break
        pos = hit + 1
        off = hit - RECORD_MAGIC_OFFSET
        if off % ALIGN or off >= stop:
            continue
        rec = decode_record_header(data, off)
        # Every record takes at least a header, which bounds how far its LSN can be.
        if (
            rec is None
            or rec.length > MAX_PAYLOAD
            or not expect <= rec.lsn <= expect + (off - damaged_at) // RECORD_HEADER_SIZE
            or rec.synced_lsn >= rec.lsn
        ):
            continue
        witness = _Witness(off, rec.lsn, rec.synced_lsn)
        if first is None:
            first = witness
        if rec.synced_lsn >= expect:
            return first, witness
    return first, None


def _looks_torn(data: bytes, fault: _Fault) -> bool:
    """Could a crash mid-write have left this record so?

    Yes if the file ends inside it, or if, in some sector it overlaps, everything from
    the record's first byte in that sector to the sector's end is zero: a lost sector
    loses the rest of the record there *and* whatever followed it in that sector.
    """
    if fault.cut:
        return True
    lo, hi = fault.offset, min(fault.end, len(data))
    while lo < hi:
        sector_end = min((lo // SECTOR + 1) * SECTOR, len(data))
        if data.count(0, lo, sector_end) == sector_end - lo:
            return True
        lo = sector_end
    return False


def _stops_short(data: bytes, fault: _Fault, nonzero_end: int) -> bool:
    """Could a write that stopped part way, at any byte, have left the last record so?
    Only if the file holds nothing after some point inside the record: its header when
    the header is bad, else its payload (padding is zero anyway). A record whose last
    payload byte is a real zero cannot be told from one cut there; it is taken as cut."""
    if not fault.header_ok:
        return nonzero_end < fault.offset + RECORD_HEADER_SIZE
    rec = decode_record_header(data, fault.offset)
    assert rec is not None  # header_ok
    return nonzero_end < fault.offset + RECORD_HEADER_SIZE + rec.length


# --- repair ---------------------------------------------------------------------------


def _repair_tail(directory: Path, scan: _Scan, segment_size: int, notes: list[str]) -> int:
    """Cut the last segment at its first bad record (bytes copied aside first) and
    preallocate it again; returns its new size."""
    capacity = max(segment_size, scan.size)
    fault = scan.fault
    if fault is None and scan.size >= capacity:
        return capacity
    if fault is not None:
        cut = fault.offset
        damaged = scan.data[cut : max(min(fault.end, scan.size), scan.nonzero_end)]
        saved = _save_damaged(directory, scan.name, cut, damaged) if damaged else None
        aside = f"{len(damaged)} damaged bytes copied to {saved}" if saved else "nothing to copy"
        notes.append(
            f"wal: torn tail in segment {scan.name} at offset {cut} (lsn {scan.next_lsn}: "
            f"{fault.reason}); truncated there, {aside}"
        )
    else:
        cut = scan.size
        notes.append(
            f"wal: segment {scan.name} was {scan.size} bytes, shorter than its "
            f"preallocation; extended to {capacity}"
        )
    fd = os.open(scan.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, cut)
        os.posix_fallocate(fd, 0, capacity)
        os.fsync(fd)
    finally:
        os.close(fd)
    return capacity


def _save_damaged(directory: Path, segment: str, offset: int, data: bytes) -> str:
    target = directory / DAMAGED_DIR
    target.mkdir(exist_ok=True)
    path = target / f"{segment}.{offset}.bin"
    n = 1
    while path.exists():
        path = target / f"{segment}.{offset}.{n}.bin"
        n += 1
    write_file_durably(path, [data])
    fsync_dir(directory)
    return f"{DAMAGED_DIR}/{path.name}"


def _remove_temp_files(directory: Path) -> None:
    for path in directory.iterdir():
        if path.name.endswith(TMP_SUFFIX) and path.is_file():
            path.unlink()
