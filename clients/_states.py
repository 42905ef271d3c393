"""Transaction states as the client SDK reports them: :class:`TxnState`, the names of
``accord.v1.TxnState`` without their ``TXN_STATE_`` prefix, and the one set of final
states. A str enum, so a state compares equal to its name (``"COMMITTED"``) and prints
and serialises as it."""

from __future__ import annotations

from enum import StrEnum

import accord.v1 as pb


class TxnState(StrEnum):
    UNSPECIFIED = "UNSPECIFIED"
    #: 2PC: begun, branches may be enlisted.
    ACTIVE = "ACTIVE"
    #: 2PC: the branch list is logged, Prepare sent.
    PREPARING = "PREPARING"
    #: 2PC: the COMMIT decision is durable, phase two is running.
    COMMITTING = "COMMITTING"
    #: 2PC: abort decided, phase two is running.
    ABORTING = "ABORTING"
    COMMITTED = "COMMITTED"
    ABORTED = "ABORTED"
    #: Saga: steps running forward.
    RUNNING = "RUNNING"
    #: Saga: a step failed (or it was cancelled): compensating.
    COMPENSATING = "COMPENSATING"
    #: Saga: every step done.
    COMPLETED = "COMPLETED"
    #: Saga: every step that ran (before the pivot) undone.
    COMPENSATED = "COMPENSATED"
    #: Saga: a compensation failed past its retry policy; an operator must act
    #: (``accord txn retry``). Not final, but nothing happens without the operator.
    STUCK = "STUCK"

    @classmethod
    def from_pb(cls, value: int) -> str:
        """The state of a ``accord.v1.TxnState`` number: a :class:`TxnState`, or the
        number as text when this client does not know it (a newer server)."""
        try:
            return cls(pb.TxnState.Name(value).removeprefix("TXN_STATE_"))  # type: ignore[arg-type]
        except ValueError:
            return str(value)

    def to_pb(self) -> pb.TxnState.ValueType:
        return pb.TxnState.Value(f"TXN_STATE_{self.value}")


#: The states a transaction never leaves.
FINAL_STATES: frozenset[TxnState] = frozenset(
    {TxnState.COMMITTED, TxnState.ABORTED, TxnState.COMPLETED, TxnState.COMPENSATED}
)
