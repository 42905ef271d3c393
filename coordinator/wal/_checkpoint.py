"""Checkpoint files: ``checkpoint-<lsn as %016x>.ckpt``, written durably, read and verified.

A checkpoint file is only *live* once a CHECKPOINT record naming it is durable in the log;
until then (and after a newer one is live) it is garbage that ``WAL.open`` removes.
"""

from __future__ import annotations

from pathlib import Path

from ._errors import WalCorruptionError
from ._files import write_file_durably
from ._format import (
    CheckpointRef,
    checkpoint_name,
    crc32c,
    decode_checkpoint_file,
    encode_checkpoint_header,
    parse_checkpoint_name,
)


def write_checkpoint_file(directory: Path, lsn: int, image: bytes) -> CheckpointRef:
    """Write the image (temp, fsync, rename, fsync dir) and return what the CHECKPOINT
    record must say about it."""
    header = encode_checkpoint_header(lsn, image)
    write_file_durably(directory / checkpoint_name(lsn), [header, image])
    return CheckpointRef(lsn, len(image), crc32c(image))


def read_checkpoint_file(directory: Path, ref: CheckpointRef) -> bytes:
    """The image named by a CHECKPOINT record, verified against the record."""
    name = checkpoint_name(ref.lsn)
    try:
        data = (directory / name).read_bytes()
    except FileNotFoundError:
        raise WalCorruptionError(
            f"wal: checkpoint file {name} named by the log is missing"
        ) from None
    decoded = decode_checkpoint_file(data)
    if isinstance(decoded, str):
        raise WalCorruptionError(f"wal: {decoded} in checkpoint file {name}")
    found, image = decoded
    if found != ref:
        raise WalCorruptionError(
            f"wal: checkpoint file {name} does not match its CHECKPOINT record "
            f"(file: lsn {found.lsn}, {found.length} bytes, crc {found.crc:#010x}; "
            f"record: lsn {ref.lsn}, {ref.length} bytes, crc {ref.crc:#010x})"
        )
    return image


def list_checkpoint_files(directory: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for path in directory.iterdir():
        lsn = parse_checkpoint_name(path.name)
        if lsn is not None:
            found[lsn] = path
    return found


def remove_checkpoints_except(directory: Path, keep_lsn: int | None) -> list[str]:
    """Delete every checkpoint file but the live one; returns the names removed."""
    removed: list[str] = []
    for lsn, path in sorted(list_checkpoint_files(directory).items()):
        if lsn != keep_lsn:
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def read_live_image(directory: Path, lsn: int) -> bytes | None:
    """The image of checkpoint file ``lsn`` (its own header and CRC verified), or None
    if the file is gone (a newer checkpoint replaced it). For the event feed's snapshot:
    call it only with the LSN of a live checkpoint."""
    name = checkpoint_name(lsn)
    try:
        data = (directory / name).read_bytes()
    except FileNotFoundError:
        return None
    decoded = decode_checkpoint_file(data)
    if isinstance(decoded, str):
        raise WalCorruptionError(f"wal: {decoded} in checkpoint file {name}")
    found, image = decoded
    if found.lsn != lsn:
        raise WalCorruptionError(f"wal: checkpoint file {name} says lsn {found.lsn}")
    return image
