"""Values that cross the SDK's module boundaries: what a handler receives and returns,
and the transport-neutral result of a branch call."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

_EMPTY: Mapping[str, str] = MappingProxyType({})


class Op(enum.StrEnum):
    """A participant call, as recorded in the barrier table's ``op`` column."""

    PREPARE = "prepare"
    COMMIT = "commit"
    ABORT = "abort"
    EXECUTE = "execute"
    COMPENSATE = "compensate"


class Vote(enum.Enum):
    """A prepare handler's yes vote. (A no vote is ``raise Refuse(reason)``.)"""

    YES = "yes"
    #: The branch changed nothing: it leaves phase two (no Commit or Abort follows).
    READ_ONLY = "read-only"


class Refuse(Exception):
    """A business "no" (gRPC ABORTED): the vote is no. Recorded by the barrier, so a
    duplicate Prepare gets the same answer without running the handler again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotYet(Exception):
    """ "Not yet" (gRPC FAILED_PRECONDITION): the coordinator retries later. Nothing is
    recorded; the handler's changes are rolled back and it runs again on the retry."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class BranchCall:
    """One participant call, as a handler sees it.

    For Commit and Abort of a prepared branch, ``operation`` and ``payload`` are the ones
    recorded at Prepare (the prepared branch is the truth, whatever the retry carries).
    """

    gid: str
    branch_id: str
    operation: str
    payload: bytes = b""
    shard: str = ""
    epoch: int = 0
    coordinator_address: str = ""
    one_phase: bool = False
    #: W3C trace context ("traceparent", "tracestate"), from the request or its metadata.
    trace_context: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    def json(self) -> Any:
        """The payload decoded as JSON (raises ``ValueError`` when it is not JSON)."""
        return json.loads(self.payload)

    @property
    def traceparent(self) -> str | None:
        return self.trace_context.get("traceparent")


class Status(enum.StrEnum):
    """Transport-neutral outcome of a call; the gRPC layer maps it to a status code in
    one table (``_servicer._CODES``)."""

    OK = "OK"
    #: Business no (ABORTED).
    REFUSED = "REFUSED"
    #: Retry later (FAILED_PRECONDITION).
    NOT_YET = "NOT_YET"
    #: Lower epoch than already seen for the shard (FAILED_PRECONDITION).
    FENCED = "FENCED"
    #: Illegal state change, e.g. Commit after Abort (FAILED_PRECONDITION).
    CONFLICT = "CONFLICT"
    #: Malformed request (INVALID_ARGUMENT).
    INVALID = "INVALID"
    UNIMPLEMENTED = "UNIMPLEMENTED"


@dataclass(frozen=True, slots=True)
class Result:
    status: Status
    message: str = ""
    read_only: bool = False
    result: bytes = b""
    #: Answered from the barrier (a duplicate call): the handler did not run. Not part of
    #: the answer (a duplicate gets an equal Result).
    duplicate: bool = field(default=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status is Status.OK
