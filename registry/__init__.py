"""The registry package: how the pieces of an Accord deployment find each other.

It owns service discovery (the :class:`Registry` interface, the etcd registry with its
watched caches, and a static registry for single-node use), keeping processes registered
(:class:`Registration`, leases and keepalive), the shard leases that fence WAL owners
(:class:`ShardLease`), the shard map clients route by, retired shards and the outcomes
kept for them (``_retire``), and the sidecar that registers a participant from outside it.

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
    EtcdTls,
    PrefixCache,
    Registration,
    configure_etcd_tls,
    coordinator_key,
    coordinator_value,
    dialable,
    find_coordinators,
    parse_coordinators,
    parse_endpoints,
    service_key,
    service_value,
)
from accord.registry._retire import (
    KeptOutcome,
    RetireRefused,
    RetireStart,
    check_retirable,
    kept_for_gid,
    kept_for_key,
    mark_retired,
    write_kept,
)
from accord.registry._shard import (
    RETIRED,
    SHARDS,
    Owner,
    Retired,
    ShardLease,
    ShardMap,
    ShardState,
    epoch_key,
    find_shards,
    kept_gid_key,
    kept_key_key,
    owner_key,
    retired_key,
    shard_map,
)
from accord.registry._sidecar import Sidecar, SidecarSettings
from accord.registry._static import StaticRegistry

__all__ = [
    "COORDINATORS",
    "DEFAULT_TTL_S",
    "RETIRED",
    "SERVICES",
    "SHARDS",
    "CoordinatorInfo",
    "Etcd",
    "EtcdRegistry",
    "EtcdTls",
    "Instance",
    "KeptOutcome",
    "NoInstanceError",
    "Owner",
    "PrefixCache",
    "Registration",
    "Registry",
    "RetireRefused",
    "RetireStart",
    "Retired",
    "ShardLease",
    "ShardMap",
    "ShardState",
    "Sidecar",
    "SidecarSettings",
    "StaticRegistry",
    "check_retirable",
    "configure_etcd_tls",
    "coordinator_key",
    "coordinator_value",
    "dialable",
    "epoch_key",
    "find_coordinators",
    "find_shards",
    "kept_for_gid",
    "kept_for_key",
    "kept_gid_key",
    "kept_key_key",
    "mark_retired",
    "owner_key",
    "parse_coordinators",
    "parse_endpoints",
    "retired_key",
    "service_key",
    "service_value",
    "shard_map",
    "write_kept",
]
