"""The transaction state table: the only place that says which state changes exist.

Every change goes through ``Engine.transition``: it checks the table, appends the change's
record to the WAL, waits until the record is durable (forced for a COMMIT decision,
written for the others under presumed abort), and only then changes memory and tells
anyone (clients, watchers, participants).
"""

from __future__ import annotations

import enum

import accord.v1 as pb


class TxnState(enum.IntEnum):
    ACTIVE = pb.TXN_STATE_ACTIVE
    PREPARING = pb.TXN_STATE_PREPARING
    COMMITTING = pb.TXN_STATE_COMMITTING
    ABORTING = pb.TXN_STATE_ABORTING
    COMMITTED = pb.TXN_STATE_COMMITTED
    ABORTED = pb.TXN_STATE_ABORTED

    @property
    def final(self) -> bool:
        return self in (TxnState.COMMITTED, TxnState.ABORTED)

    @property
    def decided(self) -> bool:
        """The outcome is fixed (durable decision or final state)."""
        return self in (TxnState.COMMITTING, TxnState.ABORTING, *_FINAL)


_FINAL = (TxnState.COMMITTED, TxnState.ABORTED)


class BranchState(enum.IntEnum):
    PENDING = pb.BRANCH_STATE_PENDING
    PREPARED = pb.BRANCH_STATE_PREPARED
    READ_ONLY = pb.BRANCH_STATE_READ_ONLY
    REFUSED = pb.BRANCH_STATE_REFUSED
    COMMITTED = pb.BRANCH_STATE_COMMITTED
    ABORTED = pb.BRANCH_STATE_ABORTED


S = TxnState

#: (from, to) -> why it exists. Anything not here is forbidden.
TRANSITIONS: dict[tuple[TxnState, TxnState], str] = {
    (S.ACTIVE, S.PREPARING): "Commit: branch list logged, Prepare about to be sent",
    (S.ACTIVE, S.ABORTING): "client Abort or deadline before Commit",
    (S.PREPARING, S.COMMITTING): "every vote yes: COMMIT decision forced",
    (
        S.PREPARING,
        S.ABORTING,
    ): "a no vote, the deadline, a client Abort, or restart (presumed abort)",
    (S.PREPARING, S.COMMITTED): "all voted read-only, or a one-phase commit said yes",
    (S.PREPARING, S.ABORTED): "a one-phase commit said no (nothing else is held)",
    (S.COMMITTING, S.COMMITTED): "every phase-two Commit acknowledged (END, lazy)",
    (S.ABORTING, S.ABORTED): "every phase-two Abort acknowledged (END, lazy)",
}


def allowed(old: TxnState, new: TxnState) -> bool:
    return (old, new) in TRANSITIONS
