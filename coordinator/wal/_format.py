"""Encoder and decoder for the on-disk structures (see the package docstring for the prose).

Pure functions over bytes: no file I/O here, so the layout lives in one place.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Final

import crc32c as _crc32c

# Records and segment starts are aligned to this; a 4-byte length word at an aligned
# offset therefore never straddles a sector (512 B) or page boundary and cannot be torn.
ALIGN: Final = 8
# Damage is judged per sector: a crash leaves whole sectors either new or old (zero).
SECTOR: Final = 512

MAX_PAYLOAD: Final = 16 * 1024 * 1024
"""Largest payload accepted by ``submit`` (bytes); larger raises WalError."""

RTYPE_CHECKPOINT: Final = 1
FIRST_USER_RTYPE: Final = 16
"""Record types below this are the WAL's own (1 = CHECKPOINT); the engine uses >= 16."""
MAX_RTYPE: Final = 0xFFFF

# --- segment header -------------------------------------------------------------------
SEGMENT_MAGIC: Final = b"ACCWAL\x00\x01"
SEGMENT_VERSION: Final = 1
# magic, first_lsn, prev_crc, version, reserved, header crc (over the first 28 bytes)
_SEGMENT_HEADER = struct.Struct("<8sQIIII")
SEGMENT_HEADER_SIZE: Final = _SEGMENT_HEADER.size  # 32

# --- record header --------------------------------------------------------------------
RECORD_MAGIC: Final = 0xA5C3
# length, chained crc, lsn, synced_lsn, rtype, magic, header crc (over the first 28 bytes)
_RECORD_HEADER = struct.Struct("<IIQQHHI")
RECORD_HEADER_SIZE: Final = _RECORD_HEADER.size  # 32
# The fields the chained CRC covers, in header order minus the two CRCs.
_CHAINED_FIELDS = struct.Struct("<IQQHH")
RECORD_MAGIC_BYTES: Final = struct.pack("<H", RECORD_MAGIC)
RECORD_MAGIC_OFFSET: Final = 26  # where the magic sits inside a record header
ZERO_RECORD_HEADER: Final = bytes(RECORD_HEADER_SIZE)

# --- checkpoint file and CHECKPOINT record --------------------------------------------
CHECKPOINT_MAGIC: Final = b"ACCCKPT\x01"
# magic, lsn, image length, image crc, header crc (over the first 28 bytes)
_CHECKPOINT_HEADER = struct.Struct("<8sQQII")
CHECKPOINT_HEADER_SIZE: Final = _CHECKPOINT_HEADER.size  # 32
# lsn, image length, image crc, reserved
_CHECKPOINT_RECORD = struct.Struct("<QQII")

_SEGMENT_NAME = re.compile(r"^([0-9a-f]{16})\.wal$")
_CHECKPOINT_NAME = re.compile(r"^checkpoint-([0-9a-f]{16})\.ckpt$")


def crc32c(data: bytes | memoryview, value: int = 0) -> int:
    result: int = _crc32c.crc32c(data, value)
    return result


def align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def record_size(payload_len: int) -> int:
    """Bytes a record with this payload occupies on disk (header + payload + padding)."""
    return RECORD_HEADER_SIZE + align(payload_len)


# --- names ----------------------------------------------------------------------------


def segment_name(first_lsn: int) -> str:
    return f"{first_lsn:016x}.wal"


def parse_segment_name(name: str) -> int | None:
    m = _SEGMENT_NAME.match(name)
    return int(m.group(1), 16) if m else None


def checkpoint_name(lsn: int) -> str:
    return f"checkpoint-{lsn:016x}.ckpt"


def parse_checkpoint_name(name: str) -> int | None:
    m = _CHECKPOINT_NAME.match(name)
    return int(m.group(1), 16) if m else None


# --- segment header -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    first_lsn: int
    prev_crc: int


def encode_segment_header(first_lsn: int, prev_crc: int) -> bytes:
    body = _SEGMENT_HEADER.pack(SEGMENT_MAGIC, first_lsn, prev_crc, SEGMENT_VERSION, 0, 0)
    return body[:-4] + struct.pack("<I", crc32c(body[:-4]))


def decode_segment_header(buf: bytes) -> SegmentHeader | str:
    """The header, or a reason why it is not a valid one."""
    if len(buf) < SEGMENT_HEADER_SIZE:
        return "segment header cut short"
    magic, first_lsn, prev_crc, version, _reserved, hcrc = _SEGMENT_HEADER.unpack_from(buf)
    if magic != SEGMENT_MAGIC:
        return "bad segment magic"
    if crc32c(buf[: SEGMENT_HEADER_SIZE - 4]) != hcrc:
        return "segment header checksum mismatch"
    if version != SEGMENT_VERSION:
        return f"unsupported segment version {version}"
    return SegmentHeader(first_lsn, prev_crc)


# --- records --------------------------------------------------------------------------


def encode_record(
    lsn: int, rtype: int, payload: bytes, synced_lsn: int, prev_crc: int
) -> tuple[list[bytes], int]:
    """The record as buffers to write (header, payload, padding) and its chained CRC."""
    length = len(payload)
    fields = _CHAINED_FIELDS.pack(length, lsn, synced_lsn, rtype, RECORD_MAGIC)
    crc = crc32c(payload, crc32c(fields, prev_crc))
    head = _RECORD_HEADER.pack(length, crc, lsn, synced_lsn, rtype, RECORD_MAGIC, 0)[:-4]
    parts = [head + struct.pack("<I", crc32c(head))]
    if length:
        parts.append(payload)
    pad = align(length) - length
    if pad:
        parts.append(bytes(pad))
    return parts, crc


@dataclass(frozen=True, slots=True)
class RecordHeader:
    length: int
    crc: int
    lsn: int
    synced_lsn: int
    rtype: int

    @property
    def size(self) -> int:
        return record_size(self.length)


def decode_record_header(buf: bytes, offset: int) -> RecordHeader | None:
    """The header at ``offset`` if its magic and header CRC verify, else None."""
    if offset + RECORD_HEADER_SIZE > len(buf):
        return None
    length, crc, lsn, synced, rtype, magic, hcrc = _RECORD_HEADER.unpack_from(buf, offset)
    if magic != RECORD_MAGIC:
        return None
    if crc32c(memoryview(buf)[offset : offset + RECORD_HEADER_SIZE - 4]) != hcrc:
        return None
    return RecordHeader(length, crc, lsn, synced, rtype)


def chained_crc(header: RecordHeader, payload: bytes | memoryview, prev_crc: int) -> int:
    fields = _CHAINED_FIELDS.pack(
        header.length, header.lsn, header.synced_lsn, header.rtype, RECORD_MAGIC
    )
    return crc32c(payload, crc32c(fields, prev_crc))


# --- checkpoints ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckpointRef:
    """What a CHECKPOINT record says about its file."""

    lsn: int
    length: int
    crc: int


def encode_checkpoint_header(lsn: int, image: bytes) -> bytes:
    body = _CHECKPOINT_HEADER.pack(CHECKPOINT_MAGIC, lsn, len(image), crc32c(image), 0)[:-4]
    return body + struct.pack("<I", crc32c(body))


def decode_checkpoint_file(buf: bytes) -> tuple[CheckpointRef, bytes] | str:
    """(reference, image) of a checkpoint file's contents, or a reason why it is invalid."""
    if len(buf) < CHECKPOINT_HEADER_SIZE:
        return "checkpoint header cut short"
    magic, lsn, length, crc, hcrc = _CHECKPOINT_HEADER.unpack_from(buf)
    if magic != CHECKPOINT_MAGIC:
        return "bad checkpoint magic"
    if crc32c(buf[: CHECKPOINT_HEADER_SIZE - 4]) != hcrc:
        return "checkpoint header checksum mismatch"
    image = buf[CHECKPOINT_HEADER_SIZE:]
    if len(image) != length:
        return f"checkpoint image is {len(image)} bytes, header says {length}"
    if crc32c(image) != crc:
        return "checkpoint image crc mismatch"
    return CheckpointRef(lsn, length, crc), image


def encode_checkpoint_record(ref: CheckpointRef) -> bytes:
    return _CHECKPOINT_RECORD.pack(ref.lsn, ref.length, ref.crc, 0)


def decode_checkpoint_record(payload: bytes) -> CheckpointRef | None:
    if len(payload) != _CHECKPOINT_RECORD.size:
        return None
    lsn, length, crc, _reserved = _CHECKPOINT_RECORD.unpack(payload)
    return CheckpointRef(lsn, length, crc)
