"""The registry package owns how every piece finds and connects to every other: service
discovery (the :class:`Registry` interface, a static implementation, and later etcd) and
transport (every gRPC server and channel is built in :mod:`registry.transport`). The etcd
implementation also keeps processes registered (:class:`Registration`).

It must not know about transactions."""

from registry._base import Instance, NoInstanceError, Registry
from registry._etcd import (
    COORDINATORS,
    DEFAULT_TTL_S,
    SERVICES,
    CoordinatorInfo,
    Etcd,
    EtcdRegistry,
    PrefixCache,
    Registration,
    coordinator_key,
    coordinator_value,
    dialable,
    find_coordinators,
    parse_coordinators,
    parse_endpoints,
    service_key,
    service_value,
)
from registry._shard import SHARDS, Owner, ShardLease, epoch_key, owner_key
from registry._sidecar import Sidecar, SidecarSettings
from registry._static import StaticRegistry

__all__ = [
    "COORDINATORS",
    "DEFAULT_TTL_S",
    "SERVICES",
    "SHARDS",
    "CoordinatorInfo",
    "Etcd",
    "EtcdRegistry",
    "Instance",
    "NoInstanceError",
    "Owner",
    "PrefixCache",
    "Registration",
    "Registry",
    "ShardLease",
    "Sidecar",
    "SidecarSettings",
    "StaticRegistry",
    "coordinator_key",
    "coordinator_value",
    "dialable",
    "epoch_key",
    "find_coordinators",
    "owner_key",
    "parse_coordinators",
    "parse_endpoints",
    "service_key",
    "service_value",
]
