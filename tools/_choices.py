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
    KILL_ETCD_MEMBER = "kill-etcd-member"
    PARTITION_ETCD_MEMBER = "partition-etcd-member"
    PARTITION = "partition"
    PARTITION_ONE_WAY = "partition-one-way"
    CUT_ETCD = "cut-etcd"
    CUT_PREPARED = "cut-prepared"
    LATENCY = "latency"
    LOSS = "loss"


#: The faults that need each process on its own host (``accord chaos --net``).
NET_FAULTS = frozenset(
    {
        Fault.PARTITION_ETCD_MEMBER,
        Fault.PARTITION,
        Fault.PARTITION_ONE_WAY,
        Fault.CUT_ETCD,
        Fault.CUT_PREPARED,
        Fault.LATENCY,
        Fault.LOSS,
    }
)
#: The faults that need an etcd cluster (``--etcd-members 3``).
CLUSTER_FAULTS = frozenset({Fault.KILL_ETCD_MEMBER, Fault.PARTITION_ETCD_MEMBER})


#: What each :class:`Fault` does, for ``accord chaos --help`` (which lists them all).
FAULT_HELP: Mapping[Fault, str] = {
    Fault.KILL_COORDINATOR: "SIGKILL a shard's owner; it comes back as the standby",
    Fault.KILL_PARTICIPANT: "SIGKILL a bank participant; it comes back",
    Fault.PAUSE: "SIGSTOP a participant or coordinator past its lease",
    Fault.ETCD: "stop etcd for a while",
    Fault.POWER_LOSS: "a shard's owner loses its unsynced WAL tail and is killed",
    Fault.KILL_ETCD_MEMBER: "SIGKILL one etcd member; it comes back (--etcd-members 3)",
    Fault.PARTITION_ETCD_MEMBER: "cut one etcd member off from every other host (--net)",
    Fault.PARTITION: "drop packets both ways between a shard's owner and a bank (--net)",
    Fault.PARTITION_ONE_WAY: "drop packets one way between a shard's owner and a bank (--net)",
    Fault.CUT_ETCD: "cut a shard's owner off from every etcd member: it must stop acting "
    "before its lease can be taken over (--net)",
    Fault.CUT_PREPARED: "cut a bank holding prepared branches off from every coordinator (--net)",
    Fault.LATENCY: "50 ms ± 20 ms both ways between a shard's owner and a bank (--net)",
    Fault.LOSS: "5 % packet loss both ways between a shard's owner and a bank (--net)",
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
