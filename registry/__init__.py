"""The registry package: how the pieces of an Accord deployment find each other.

It owns service discovery (the :class:`Registry` interface, the etcd registry with its
watched caches, and a static registry for single-node use), keeping processes registered
(:class:`Registration`, leases and keepalive), the shard leases that fence WAL owners
(:class:`ShardLease`), and the sidecar that registers a participant from outside it.

It must not know about transactions: to it a gid is an opaque string. Building servers
and channels, telemetry and the gid format live in :mod:`accord.common`."""

from accord.registry._base import Instance, NoInstanceError, Registry
from accord.registry._etcd import (
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
from accord.registry._shard import (
    SHARDS,
    Owner,
    ShardLease,
    ShardMap,
    epoch_key,
    find_shards,
    owner_key,
    shard_map,
)
from accord.registry._sidecar import Sidecar, SidecarSettings
from accord.registry._static import StaticRegistry

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
    "ShardMap",
    "Sidecar",
    "SidecarSettings",
    "StaticRegistry",
    "coordinator_key",
    "coordinator_value",
    "dialable",
    "epoch_key",
    "find_coordinators",
    "find_shards",
    "owner_key",
    "parse_coordinators",
    "parse_endpoints",
    "service_key",
    "service_value",
    "shard_map",
]
