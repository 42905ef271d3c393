"""The coordinator's durable write-ahead log.

What this package owns: the files in one WAL directory (segments, checkpoint files, the
LOCK file, ``damaged/``). What it must not touch: anything else; it knows nothing about
transactions (payloads are opaque bytes; record types >= 16 belong to the engine).

FILE FORMAT
===========

All integers are little-endian. CRCs are CRC-32C (Castagnoli).

Directory
---------
``LOCK``
    Held with a non-blocking ``flock`` by the one process that owns the directory
    (it contains that process's pid, for the error message only).
``%016x.wal``
    Segments, named after the first LSN they hold (hex). Preallocated to the segment size
    (``posix_fallocate``); unused space reads as zero. A segment is created as a temp file,
    its header written and fdatasync'ed, then renamed into place and the directory
    fsync'ed, so a ``.wal`` file always has a durable header. The previous segment is
    fdatasync'ed before a new one is started, so only the last segment can have a torn
    tail.
``checkpoint-%016x.ckpt``
    Checkpoint images, named after the LSN they reflect (written temp, fsync, rename,
    fsync dir). Live only once a CHECKPOINT record naming it is durable.
``SYNCED``
    Only with ``sync_marker=True`` (chaos testing): the highest LSN covered by a
    completed fdatasync, as decimal text, rewritten (not fsynced) after every sync.
    :func:`drop_unsynced` uses it to make a directory look as it would after a power
    loss: every record past it gone.
``damaged/<segment>.<offset>.bin``
    Bytes cut from a torn tail at start-up, kept for inspection.
``*.tmp``
    Files being built (the spare segment, a checkpoint); removed at open.

Segment header (32 bytes, at offset 0)
--------------------------------------
::

    0   8  magic       b"ACCWAL\\x00\\x01"
    8   8  first_lsn   LSN of the first record in this segment (= the file name)
    16  4  prev_crc    chained CRC of the last record before this segment (0 for LSN 1)
    20  4  version     1
    24  4  reserved    0
    28  4  header_crc  CRC-32C of bytes 0..27

Records (from offset 32, each starting at a multiple of 8)
----------------------------------------------------------
::

    0   4  length      payload length in bytes (at most 16 MiB)
    4   4  crc         chained CRC: crc32c(length, lsn, synced_lsn, rtype, magic
                       as packed here, then the payload), seeded with the previous
                       record's crc (or the segment header's prev_crc)
    8   8  lsn         1, 2, 3, ... with no gaps, across segments
    16  8  synced_lsn  highest LSN covered by a completed fdatasync when this
                       record was written (used by recovery, see below)
    24  2  rtype       record type: 1 = CHECKPOINT, 2..15 reserved, >= 16 the engine's
    26  2  magic       0xA5C3 (lets recovery find record headers after damage)
    28  4  header_crc  CRC-32C of bytes 0..27 (checks a header on its own)
    32     payload, then zero padding up to a multiple of 8

Alignment keeps every length word inside one sector, so it is never torn. Because the
CRC chains from record to record (and across segments through ``prev_crc``), a record
that verifies also proves the whole log before it in that segment is the one written.
A record never spans segments; a record too big for an empty segment grows that segment.
The first all-zero header (with only zeros after it) is the end of a segment.

CHECKPOINT record payload (24 bytes): ``lsn u64`` (the image reflects every record up to
it), ``image length u64``, ``image crc32c u32``, ``reserved u32``.

Checkpoint file: a 32-byte header ``magic b"ACCCKPT\\x01", lsn u64, length u64,
image crc u32, header_crc u32 (of bytes 0..27)``, then the image.

Recovery
--------
``WAL.open`` scans every segment and checks headers, LSN continuity and the CRC chain.
The newest CHECKPOINT record names the checkpoint file to load; records after its LSN
are returned. A torn or zeroed tail of the last segment is repaired (damaged bytes
copied aside, the file cut at the first bad record and preallocated again); a bad
record anywhere else raises WalCorruptionError naming the segment and the offset.

Torn or corrupt (full rule in ``accord.coordinator.wal._recovery``): only the last segment can
have a torn tail. Damage there at offset X is corruption if a later record header (found
by its magic at an aligned offset, header CRC verified, plausible LSN) has a
``synced_lsn`` at or past the damaged record's LSN, which proves the damaged bytes had
been durable; or if any valid record follows and the damage does not look like an
interrupted write (cut by the end of the file, or a zeroed sector); or if nothing
follows and the damaged record is complete (bytes up to its end, a flipped bit), which
no interrupted write leaves. Otherwise it is a torn tail and is repaired.

LSNs are never reused for records that were acknowledged: after a crash the next LSN
follows the last record that survived (an LSN handed out for a record that was lost
before it was durable may be handed out again; its caller never heard "durable").

Disk use stays bounded: after a checkpoint at LSN L, segments whose records are all <= L
are deleted (never the one holding the CHECKPOINT record, nor the active one), and so
are older checkpoint files. Add one preallocated spare segment (``spare.wal.tmp``).
"""

from __future__ import annotations

from ._checkpoint import read_live_image
from ._errors import WalCorruptionError, WalError, WalFatalError, WalLockedError
from ._format import FIRST_USER_RTYPE, MAX_PAYLOAD, RTYPE_CHECKPOINT
from ._powerloss import drop_unsynced
from ._reader import LogReader, RecordsGone
from ._segment import SYNC_MARKER
from ._types import FeedSink, RecoveredLog, WalRecord, WalStats
from ._wal import DEFAULT_SEGMENT_SIZE, WAL

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "FIRST_USER_RTYPE",
    "MAX_PAYLOAD",
    "RTYPE_CHECKPOINT",
    "SYNC_MARKER",
    "WAL",
    "FeedSink",
    "LogReader",
    "RecordsGone",
    "RecoveredLog",
    "WalCorruptionError",
    "WalError",
    "WalFatalError",
    "WalLockedError",
    "WalRecord",
    "WalStats",
    "drop_unsynced",
    "read_live_image",
]
