"""The WAL's exceptions. Every message starts with ``wal:`` so a log line says where it came from."""

from __future__ import annotations


class WalError(Exception):
    """Base class: a misuse (closed log, oversized payload) or any WAL failure below."""


class WalCorruptionError(WalError):
    """The log on disk is damaged somewhere other than a torn tail; start-up must stop.

    The message names the segment file and the byte offset of the first bad record.
    """


class WalFatalError(WalError):
    """A write or fdatasync failed. The log is stopped for good (fail-stop): nothing that
    was pending is reported durable, and every later call fails with this error."""


class WalLockedError(WalError):
    """Another process (or another ``WAL`` in this process) owns the directory."""
