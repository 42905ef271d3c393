"""The choices the tools offer, as enums, in a module that imports nothing heavy: the
command line reads them at every start, and their owners (the load generator, the chaos
harness) take their accepted values from here, so the two cannot drift apart."""

from __future__ import annotations

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


class ParticipantDb(StrEnum):
    """Where ``accord chaos`` keeps the banks' data."""

    SQLITE = "sqlite"
    POSTGRES = "postgres"
