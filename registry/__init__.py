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
from registry._routing import (
    GID_SEPARATOR,
    SHARD_NAME,
    check_shard_name,
    gid_prefix,
    shard_for_key,
    shard_of,
)
from registry._shard import (
    SHARDS,
    Owner,
    ShardLease,
    ShardMap,
    epoch_key,
    find_shards,
    owner_key,
    shard_map,
)
from registry._sidecar import Sidecar, SidecarSettings
from registry._static import StaticRegistry

__all__ = [
    "COORDINATORS",
    "DEFAULT_TTL_S",
    "GID_SEPARATOR",
    "SERVICES",
    "SHARDS",
    "SHARD_NAME",
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
    "check_shard_name",
    "coordinator_key",
    "coordinator_value",
    "dialable",
    "epoch_key",
    "find_coordinators",
    "find_shards",
    "gid_prefix",
    "owner_key",
    "parse_coordinators",
    "parse_endpoints",
    "service_key",
    "service_value",
    "shard_for_key",
    "shard_map",
    "shard_of",
]
