"""Small POSIX file helpers shared by the segment, checkpoint and recovery code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

TMP_SUFFIX: Final = ".tmp"
"""Files being built; a crash can leave them behind and ``WAL.open`` removes them."""


def fsync_dir(directory: Path) -> None:
    """Make creations, renames and unlinks in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(directory: Path) -> None:
    """``mkdir -p`` whose new entries survive a power cut (each parent fsync'ed)."""
    missing: list[Path] = []
    d = directory.absolute()
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        fsync_dir(d.parent)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``pwrite`` until every byte is written (a short write is legal for any file)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(f"pwrite wrote {n} bytes at offset {offset}")
        view = view[n:]
        offset += n


def write_file_durably(path: Path, chunks: list[bytes]) -> None:
    """Write ``path`` through a temp file: write, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        offset = 0
        for chunk in chunks:
            pwrite_all(fd, chunk, offset)
            offset += len(chunk)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)
