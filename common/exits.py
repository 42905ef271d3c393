"""The exit codes of every Accord command and process, named in one place.

Scripts and tests rely on the numbers, so they never change: 0 success, 1 a failed
outcome, 2 bad usage or unreadable input (click's own usage errors exit 2 as well),
70 and 75 from ``sysexits.h`` for a coordinator that stops itself, 130 for Ctrl-C.

A server stopped by SIGTERM or SIGINT exits 0 (it did what it was asked); a second
signal during its clean-up makes it exit 130 at once. A server that cannot start raises
:class:`StartupError`: one line, no traceback, :attr:`StartupError.code`."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    #: Success (a committed transaction, a completed saga, no violation found).
    OK = 0
    #: The command ran and the outcome is a failure: an aborted transaction, a saga that
    #: did not complete, violations found, no transaction succeeded, a server that failed.
    FAILURE = 1
    #: Bad arguments, or input that could not be read; nothing was done.
    USAGE = 2
    #: ``EX_SOFTWARE``: the WAL could not make a record durable, so the coordinator
    #: stopped at once (fail-stop) rather than answer from a state it cannot keep.
    WAL_FAILURE = 70
    #: ``EX_TEMPFAIL``: another coordinator owns this one's shard now (it was fenced);
    #: a supervisor may start it again, and it waits as a standby.
    FENCED = 75
    #: 128 + SIGINT: interrupted by Ctrl-C.
    INTERRUPTED = 130


class StartupError(Exception):
    """A process cannot start for a reason its message says in full (a port in use, a
    malformed address, etcd unreachable, a WAL directory another process holds): the
    command line prints it as one ``error:`` line, without a traceback, and exits with
    :attr:`code`. Unexpected failures are other exceptions, logged with their traceback."""

    code: ExitCode = ExitCode.FAILURE
