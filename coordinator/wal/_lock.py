"""One coordinator per WAL directory: an advisory ``flock`` on ``DIR/LOCK``.

``flock`` belongs to the open file description, so a second ``WAL.open`` of the same
directory conflicts even inside one process, and the kernel drops the lock when the
owner dies (no stale lock files after a crash).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Final

from ._errors import WalLockedError

LOCK_NAME: Final = "LOCK"


class DirectoryLock:
    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self.path = path

    @classmethod
    def acquire(cls, directory: Path) -> DirectoryLock:
        path = directory / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            by = f" (pid {holder})" if holder.isdigit() else ""
            raise WalLockedError(
                f"wal: directory {directory} is locked by another WAL{by}; "
                "only one coordinator may own a WAL directory"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The pid is only for the error message above; the lock itself is the flock.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        """Closing the descriptor drops the flock. Safe to call twice."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
