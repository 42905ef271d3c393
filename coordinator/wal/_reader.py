"""Reading durable records back from the segment files while the log is open (the
event feed's catch-up, ``accord.coordinator._feed``).

A :class:`LogReader` walks the segments forward from an LSN, verifying every record as
recovery does (header CRC, LSN sequence, chained CRC), and never returns a record past
the ``upto`` LSN its caller gives (the durable LSN: records after it may be written but
not yet fdatasync'ed, or not written at all). Blocking: run it in a thread. It keeps its
segment open between calls, so a segment that a checkpoint deletes under it can still be
read to its end; a segment it has not opened yet and that is gone raises
:class:`RecordsGone`, and so does a start LSN older than the oldest segment.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Final

from ._errors import WalCorruptionError, WalError
from ._format import (
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    chained_crc,
    decode_record_header,
    decode_segment_header,
    parse_segment_name,
    segment_name,
)
from ._types import WalRecord

#: Bytes read from a segment at a time (a larger record is read whole).
READ_CHUNK: Final = 1024 * 1024
_ZERO_HEADER: Final = bytes(RECORD_HEADER_SIZE)


class RecordsGone(WalError):
    """The records asked for are no longer in the log (a checkpoint removed their
    segment): the reader must start again from the checkpoint's image."""


def segments_of(directory: Path) -> list[int]:
    """First LSNs of the segments in ``directory``, oldest first."""
    return sorted(
        lsn for name in os.listdir(directory) if (lsn := parse_segment_name(name)) is not None
    )


class LogReader:
    """Reads records with an LSN above ``after`` in order. Use :meth:`read` repeatedly;
    :meth:`close` when done. Not thread-safe: one caller at a time."""

    def __init__(self, directory: Path, after: int) -> None:
        self._dir = Path(directory)
        self._next = after + 1  # the next LSN to return
        self._fd = -1
        self._name = ""
        self._offset = 0
        self._crc = 0
        self._expect = 0  # the LSN of the record at _offset
        self._buf = b""
        self._buf_at = 0  # file offset of _buf[0]

    @property
    def next_lsn(self) -> int:
        return self._next

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def read(self, upto: int, limit: int) -> list[WalRecord]:
        """Up to ``limit`` records with LSN in [next, upto], every record type included
        (the caller skips the WAL's own). Empty when next > upto."""
        out: list[WalRecord] = []
        # Bytes read by an earlier call may predate records durable now (or hold a write
        # caught half-way): read again. Within this call, every record <= upto is whole.
        self._buf, self._buf_at = b"", self._offset
        while self._next <= upto and len(out) < limit:
            if self._fd < 0:
                self._open_for(self._next)
            rec = self._record_at_offset()
            if rec is None:
                # The end of this segment: the next LSN starts the following one.
                self._open_segment(self._expect)
                continue
            if rec.lsn >= self._next:
                out.append(rec)
                self._next = rec.lsn + 1
        return out

    # --- segments -----------------------------------------------------------------------

    def _open_for(self, lsn: int) -> None:
        """Opens the segment that holds ``lsn`` and scans to it."""
        firsts = segments_of(self._dir)
        holding = [f for f in firsts if f <= lsn]
        if not holding:
            oldest = firsts[0] if firsts else None
            raise RecordsGone(f"wal: lsn {lsn} is no longer in the log (oldest segment: {oldest})")
        self._open_segment(holding[-1])

    def _open_segment(self, first: int) -> None:
        self.close()
        name = segment_name(first)
        try:
            fd = os.open(self._dir / name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RecordsGone(f"wal: segment {name} was removed (checkpoint)") from None
        head = os.pread(fd, SEGMENT_HEADER_SIZE, 0)
        header = decode_segment_header(head)
        if isinstance(header, str) or header.first_lsn != first:
            os.close(fd)
            why = header if isinstance(header, str) else "first lsn differs from the name"
            raise WalCorruptionError(f"wal: {why} in segment {name} at offset 0")
        self._fd, self._name = fd, name
        self._offset = SEGMENT_HEADER_SIZE
        self._crc = header.prev_crc
        self._expect = first
        self._buf, self._buf_at = b"", SEGMENT_HEADER_SIZE

    def _bytes(self, offset: int, n: int) -> bytes:
        end = self._buf_at + len(self._buf)
        if offset < self._buf_at or offset + n > end:
            self._buf = os.pread(self._fd, max(n, READ_CHUNK), offset)
            self._buf_at = offset
        start = offset - self._buf_at
        return self._buf[start : start + n]

    def _record_at_offset(self) -> WalRecord | None:
        """The record at the current offset (verified), or None at the segment's end."""
        off = self._offset
        head = self._bytes(off, RECORD_HEADER_SIZE)
        if len(head) < RECORD_HEADER_SIZE or head == _ZERO_HEADER:
            # The buffer may predate the record's write: look at the file itself.
            self._buf, self._buf_at = b"", off
            head = self._bytes(off, RECORD_HEADER_SIZE)
            if len(head) < RECORD_HEADER_SIZE or head == _ZERO_HEADER:
                # The end of this segment: the caller's record is durable, so it is in
                # the next one (a roll creates it before writing there).
                return None
        rec = decode_record_header(head, 0)
        if rec is None or rec.lsn != self._expect:
            raise WalCorruptionError(
                f"wal: unreadable record (expected lsn {self._expect}) in segment "
                f"{self._name} at offset {off}"
            )
        payload = self._bytes(off + RECORD_HEADER_SIZE, rec.length)
        if len(payload) != rec.length or chained_crc(rec, payload, self._crc) != rec.crc:
            raise WalCorruptionError(
                f"wal: crc mismatch (lsn {rec.lsn}) in segment {self._name} at offset {off}"
            )
        self._crc = rec.crc
        self._offset = off + rec.size
        self._expect = rec.lsn + 1
        return WalRecord(rec.lsn, rec.rtype, payload)
