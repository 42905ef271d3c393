"""The choices the tools offer, as enums, in a module that imports nothing heavy: the
command line reads them at every start, and their owners (the load generator, the chaos
harness) take their accepted values from here, so the two cannot drift apart."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class LoadMode(StrEnum):
    """What ``accord load`` runs."""

    TWO_PC = "2pc"
    SAGA = "saga"
    MIXED = "mixed"


class Fault(StrEnum):
    """What ``accord chaos`` may inject."""

    KILL_COORDINATOR = "kill-coordinator"
    KILL_PARTICIPANT = "kill-participant"
    PAUSE = "pause"
    ETCD = "etcd"
    POWER_LOSS = "power-loss"


#: What each :class:`Fault` does, for ``accord chaos --help`` (which lists them all).
FAULT_HELP: Mapping[Fault, str] = {
    Fault.KILL_COORDINATOR: "SIGKILL a shard's owner; it comes back as the standby",
    Fault.KILL_PARTICIPANT: "SIGKILL a bank participant; it comes back",
    Fault.PAUSE: "SIGSTOP a participant or coordinator past its lease",
    Fault.ETCD: "stop etcd for a while",
    Fault.POWER_LOSS: "a shard's owner loses its unsynced WAL tail and is killed",
}


class ParticipantDb(StrEnum):
    """Where ``accord chaos`` keeps the banks' data."""

    SQLITE = "sqlite"
    POSTGRES = "postgres"


class TxnStateChoice(StrEnum):
    """What ``accord txn list --state`` accepts: the client's transaction states
    (accord.client.TxnState, which the command line does not import at start-up)."""

    ACTIVE = "ACTIVE"
    PREPARING = "PREPARING"
    COMMITTING = "COMMITTING"
    ABORTING = "ABORTING"
    COMMITTED = "COMMITTED"
    ABORTED = "ABORTED"
    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    STUCK = "STUCK"
