"""Chaos testing, Jepsen style: ``accord chaos`` (:func:`run_chaos`, the harness in
:mod:`accord.tools.chaos._harness`) kills coordinators and participants under a bank
workload and records a history of client operations and injected faults; the checker
then verifies invariants offline against what the participants durably hold.

This package owns the history format (:mod:`accord.tools.chaos._history`: the dataclasses, a
reader, and :class:`HistoryWriter` for the harness), the final-state loaders, and the
checker (:func:`check` → :class:`Report`; ``python -m accord.tools.chaos.checker`` on saved
files). It only reads participant databases (read-only) and never talks to a running
process.
"""

from accord.tools.chaos._checker import (
    ATOMICITY,
    BANK_CONSERVATION,
    BOUNDED_RECOVERY,
    CHECKS,
    CLIENT_AGREEMENT,
    DEFAULT_RECOVERY_BOUND_S,
    DURABILITY,
    EXACTLY_ONCE,
    HISTORY,
    IDEMPOTENCY_KEY,
    NO_COMPENSATION_AFTER_PIVOT,
    SAGA_COMPLETENESS,
    ClientOp,
    Report,
    Violation,
    check,
)
from accord.tools.chaos._final import (
    Account,
    BarrierRow,
    BranchRow,
    CoordinatorTxn,
    LedgerEntry,
    ParticipantState,
    StateError,
    load_coordinator_state,
    load_initial,
    load_participant,
    merge_coordinator_lists,
)
from accord.tools.chaos._harness import INJECTABLE_FAULTS, Chaos, ChaosSettings
from accord.tools.chaos._history import (
    Completion,
    Event,
    Fault,
    HistoryError,
    HistoryWriter,
    Invoke,
    Quiescent,
    SagaStepSpec,
    TransferBranch,
    classify,
    event_from_dict,
    parse_saga,
    parse_transfer,
    read_history,
    saga_request,
    transfer_request,
    write_history,
)
from accord.tools.chaos._render import render_report
from accord.tools.chaos._run import run_chaos

__all__ = [
    "ATOMICITY",
    "BANK_CONSERVATION",
    "BOUNDED_RECOVERY",
    "CHECKS",
    "CLIENT_AGREEMENT",
    "DEFAULT_RECOVERY_BOUND_S",
    "DURABILITY",
    "EXACTLY_ONCE",
    "HISTORY",
    "IDEMPOTENCY_KEY",
    "INJECTABLE_FAULTS",
    "NO_COMPENSATION_AFTER_PIVOT",
    "SAGA_COMPLETENESS",
    "Account",
    "BarrierRow",
    "BranchRow",
    "Chaos",
    "ChaosSettings",
    "ClientOp",
    "Completion",
    "CoordinatorTxn",
    "Event",
    "Fault",
    "HistoryError",
    "HistoryWriter",
    "Invoke",
    "LedgerEntry",
    "ParticipantState",
    "Quiescent",
    "Report",
    "SagaStepSpec",
    "StateError",
    "TransferBranch",
    "Violation",
    "check",
    "classify",
    "event_from_dict",
    "load_coordinator_state",
    "load_initial",
    "load_participant",
    "merge_coordinator_lists",
    "parse_saga",
    "parse_transfer",
    "read_history",
    "render_report",
    "run_chaos",
    "saga_request",
    "transfer_request",
    "write_history",
]
