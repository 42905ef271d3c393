"""Simulating a power loss on a WAL directory, for chaos testing.

A SIGKILL leaves the page cache intact: every record ``write()`` has handed to the
kernel survives, synced or not, so a kill alone never tests fsync. A power loss keeps
only what an fdatasync completed. With a directory opened with ``sync_marker=True`` the
``SYNCED`` file says how far that is; :func:`drop_unsynced` cuts everything after it
(zeroes the rest of that segment, deletes later ones), exactly what recovery would find
if the machine had lost power at that moment. Use it only on a directory no process
holds (the owner stopped or killed).
"""

from __future__ import annotations

import os
from pathlib import Path

from accord.coordinator.wal._errors import WalError
from accord.coordinator.wal._format import parse_segment_name
from accord.coordinator.wal._recovery import _scan_segment
from accord.coordinator.wal._segment import SYNC_MARKER


def drop_unsynced(directory: Path) -> int:
    """Cuts the log after the last synced record; returns how many records it dropped."""
    directory = Path(directory)
    marker = directory / SYNC_MARKER
    if not marker.exists():
        raise WalError(f"wal: {marker} is missing: open the WAL with sync_marker=True")
    synced = int(marker.read_text().strip() or 0)
    dropped = 0
    segments = sorted(
        (lsn, path)
        for path in directory.iterdir()
        if (lsn := parse_segment_name(path.name)) is not None
    )
    for first_lsn, path in segments:
        scan = _scan_segment(path, first_lsn)
        if first_lsn > synced:
            dropped += len(scan.records)
            path.unlink()
            continue
        keep = [r for r in scan.records if r.lsn <= synced]
        if len(keep) == len(scan.records):
            continue
        cut = scan.records[len(keep)].offset
        dropped += len(scan.records) - len(keep)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(scan.size - cut), cut)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    return dropped
