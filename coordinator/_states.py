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
    RUNNING = pb.TXN_STATE_RUNNING
    COMPENSATING = pb.TXN_STATE_COMPENSATING
    COMPLETED = pb.TXN_STATE_COMPLETED
    COMPENSATED = pb.TXN_STATE_COMPENSATED
    STUCK = pb.TXN_STATE_STUCK

    @property
    def final(self) -> bool:
        return self in _FINAL

    @property
    def decided(self) -> bool:
        """What a waiting client is told about: a durable 2PC decision, a final state,
        or a saga that is STUCK (waiting for an operator)."""
        return self in _DECIDED


_FINAL = frozenset({TxnState.COMMITTED, TxnState.ABORTED, TxnState.COMPLETED, TxnState.COMPENSATED})
_DECIDED = _FINAL | {TxnState.COMMITTING, TxnState.ABORTING, TxnState.STUCK}


class Outcome(enum.IntEnum):
    """A 2PC transaction's outcome as a participant asks for it (``QueryOutcome``)."""

    IN_PROGRESS = pb.OUTCOME_IN_PROGRESS
    COMMITTED = pb.OUTCOME_COMMITTED
    ABORTED = pb.OUTCOME_ABORTED


class BranchState(enum.IntEnum):
    PENDING = pb.BRANCH_STATE_PENDING
    PREPARED = pb.BRANCH_STATE_PREPARED
    READ_ONLY = pb.BRANCH_STATE_READ_ONLY
    REFUSED = pb.BRANCH_STATE_REFUSED
    COMMITTED = pb.BRANCH_STATE_COMMITTED
    ABORTED = pb.BRANCH_STATE_ABORTED
    RUNNING = pb.BRANCH_STATE_RUNNING
    SUCCEEDED = pb.BRANCH_STATE_SUCCEEDED
    FAILED = pb.BRANCH_STATE_FAILED
    COMPENSATING = pb.BRANCH_STATE_COMPENSATING
    COMPENSATED = pb.BRANCH_STATE_COMPENSATED
    SKIPPED = pb.BRANCH_STATE_SKIPPED
    #: A saga step whose attempts ran out (or were stopped) with none able to have
    #: reached the participant: it did not run, so nothing is compensated.
    UNDELIVERED = pb.BRANCH_STATE_UNDELIVERED


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
    # Sagas (a saga is created RUNNING by its SAGA_START record):
    (S.RUNNING, S.COMPLETED): "every step done",
    (
        S.RUNNING,
        S.COMPENSATING,
    ): "a step failed for good, CancelSaga, or the deadline, before the pivot",
    (
        S.COMPENSATING,
        S.COMPENSATED,
    ): "every step that ran, or may have, is compensated (an UNDELIVERED one needs none)",
    (S.COMPENSATING, S.STUCK): "a compensation failed past its retry policy",
    (S.STUCK, S.COMPENSATING): "an operator's RetryTransaction",
}


def allowed(old: TxnState, new: TxnState) -> bool:
    return (old, new) in TRANSITIONS
