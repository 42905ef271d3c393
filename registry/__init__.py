"""The registry package owns how every piece finds and connects to every other: service
discovery (the :class:`Registry` interface, a static implementation, and later etcd) and
transport (every gRPC server and channel is built in :mod:`registry.transport`).

It must not know about transactions."""

from registry._base import Instance, NoInstanceError, Registry
from registry._static import StaticRegistry

__all__ = ["Instance", "NoInstanceError", "Registry", "StaticRegistry"]
