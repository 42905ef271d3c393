"""The two interfaces between the engine and a protocol.

:class:`Mode` is what the engine needs of a protocol (2PC in ``_twopc``, sagas in
``_saga``): drive a transaction, say which record a state change writes, apply a
replayed record, say what recovery does with an unfinished transaction. The engine
keeps one mode per protocol in a table and never asks which protocol a transaction is.

:class:`Host` is all a mode may use of the engine: the state change (check, log, wait
for durability, apply, tell), appending a record of its own, the one retrying
participant call, and the clock, failpoints, telemetry and settings. A mode touches
nothing else of the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from accord.common.retry import Backoff

if TYPE_CHECKING:
    import asyncio

    from opentelemetry.trace import Span

    import accord.v1 as pb
    from accord.coordinator._calls import CallResult
    from accord.coordinator._config import CoordinatorConfig
    from accord.coordinator._failpoints import Failpoints
    from accord.coordinator._methods import Method
    from accord.coordinator._model import Txn
    from accord.coordinator._records import Record, RecordType
    from accord.coordinator._states import TxnState
    from accord.coordinator._telemetry import CoordinatorTelemetry


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class CallTarget(Protocol):
    """A 2PC branch or a saga step, as the participant call loop sees it."""

    @property
    def service(self) -> str: ...

    @property
    def address(self) -> str: ...

    #: The instance the next attempt goes to (routing; see ``_calls``).
    resolved: str
    last_error: str

    def attempted(self, method: Method) -> None:
        """Counts one more attempt of ``method``."""

    def answered(self, method: Method, result: CallResult) -> None:
        """One attempt of ``method`` ended with ``result`` (after :meth:`attempted`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CallPolicy:
    """How :meth:`Host.call` retries: answers "retry later" back off on ``backoff``
    until ``max_attempts`` (0: no limit) or the call's deadline."""

    backoff: Backoff
    #: Deadline of one attempt.
    attempt_s: float
    max_attempts: int = 0
    #: A "no" (ABORTED, or a status in ``final_codes``) is the answer, returned as it
    #: is; when False it is retried like "retry later" (a compensation must run).
    no_is_final: bool = True
    final_codes: frozenset[str] = field(default_factory=frozenset)
    #: A "no" is kept as the target's ``last_error`` (a failed saga step), not only a
    #: "retry later" answer.
    no_is_error: bool = False


class Host(Protocol):
    """What a :class:`Mode` may use of the engine (see the module docstring)."""

    @property
    def config(self) -> CoordinatorConfig: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def failpoints(self) -> Failpoints: ...

    @property
    def telemetry(self) -> CoordinatorTelemetry: ...

    async def transition(
        self,
        txn: Txn,
        new: TxnState,
        *,
        reason: str = "",
        commit_branches: Sequence[str] = (),
    ) -> int:
        """Checks the state table, appends the mode's record for the change, waits for
        durability, then changes memory and tells watchers. Returns the LSN."""
        ...

    async def append(
        self, rtype: RecordType, record: Record, *, sync: bool, parent: Span | None = None
    ) -> int:
        """Appends a record of the mode's own (not a state change) and waits until it is
        durable (``sync``: fdatasync'ed). Returns its LSN."""
        ...

    def append_later(self, rtype: RecordType, record: Record) -> int:
        """Appends a record of the mode's own without waiting for it: it is written with
        the next group commit, after every record submitted before it. Returns its LSN."""
        ...

    def publish(self, txn: Txn) -> None:
        """Tells ``txn``'s watchers about a change the mode made after an append."""

    def request(
        self, gid: str, branch_id: str, operation: str, payload: bytes, *, one_phase: bool = False
    ) -> pb.BranchRequest:
        """A participant request carrying this coordinator's fencing epoch."""
        ...

    async def call(
        self,
        txn: Txn,
        target: CallTarget,
        method: Method,
        request: pb.BranchRequest,
        policy: CallPolicy,
        *,
        parent: Span | None,
        deadline_ms: int | None = None,
        stop: asyncio.Event | None = None,
        forever: Callable[[], bool] | None = None,
    ) -> CallResult | None:
        """Calls until a final answer (the one retry loop). None when the attempts run
        out, ``deadline_ms`` passes or ``stop`` is set first. ``forever``: asked after
        each refused attempt; True means no answer but OK ends the calls."""
        ...


#: What applying a replayed record gives the engine: the transaction (made by the
#: record, or the one it belongs to) and the state it enters (None: no state change).
Replayed = tuple["Txn", "TxnState | None"]


class Mode(Protocol):
    """One protocol, behind one interface (see the module docstring)."""

    #: ``accord.v1.Protocol`` value of the transactions this mode drives.
    protocol: int
    #: The record types this mode writes (replay routes them here).
    records: frozenset[RecordType]
    #: Completes "transaction <gid> ..." when a call of another protocol's API is
    #: given one of this mode's transactions.
    misuse: str

    async def run(self, txn: Txn) -> None:
        """Drives ``txn`` from whatever state it is in to its end (live and recovered
        transactions alike)."""

    def record(
        self, txn: Txn, new: TxnState, reason: str, commit_branches: Sequence[str]
    ) -> tuple[RecordType, Record, bool]:
        """The record that makes ``new`` durable, kept on ``txn`` for checkpoints, and
        whether it is forced."""
        ...

    def entered(self, txn: Txn, state: TxnState) -> None:
        """``txn`` entered ``state`` (live or replayed): the mode's own bookkeeping."""

    def replay(self, rtype: RecordType, rec: Record, txn: Txn | None) -> Replayed | None:
        """Applies a replayed record to ``txn`` (None: not known yet). None when the
        record cannot apply (its transaction is unknown)."""
        ...

    async def recover(self, txn: Txn) -> bool:
        """What recovery does with an unfinished transaction before it is driven again
        (2PC: presumed abort); False when it must not be driven (a STUCK saga waits for
        an operator)."""
        ...
