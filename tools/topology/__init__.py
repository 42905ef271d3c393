"""Topologies of Accord processes on this machine, for the demo, the chaos harness, the
benchmark rows and the integration tests: etcd, coordinators (owners and standbys of WAL
shards) and participants started as processes on 127.0.0.1, each ready once it says so,
every one stopped by PID.

- :class:`Topology` starts them under one directory and stops them all (``with`` or
  ``async with``), last started first;
- :class:`ManagedProcess` is one of them, with the faults the chaos harness injects
  (``kill``: SIGKILL, ``pause``/``resume``: SIGSTOP/SIGCONT) and restarts (``start``
  again, same command line); :class:`EtcdServer` is etcd, :class:`NatsServer` a NATS
  server with JetStream;
- :class:`NetLab` puts processes on hosts of their own (network namespaces on a bridge)
  and cuts, slows down or loses the packets between them (:class:`Fault`);
- :func:`free_port` reserves a port for a process that must be told its port;
- :func:`open_accounts`, :func:`balances` and :func:`numbered_accounts` use the bank's
  admin API.

It owns no part of Accord: it only runs the command lines the parts document."""

from accord.tools.topology._bank import balances, numbered_accounts, open_accounts
from accord.tools.topology._nats import NatsServer, nats_server_binary
from accord.tools.topology._netns import (
    Fault,
    NetHost,
    NetLab,
    NetLabError,
    cleanup_stale_labs,
    netns_available,
)
from accord.tools.topology._postgres import PostgresServer, postgres_bindir
from accord.tools.topology._process import (
    EtcdServer,
    ManagedProcess,
    ProcessFailed,
    accord_argv,
    etcd_binary,
    free_port,
    stop_all,
)
from accord.tools.topology._topology import Role, Topology, etcd_url, workdir

__all__ = [
    "EtcdServer",
    "Fault",
    "ManagedProcess",
    "NatsServer",
    "NetHost",
    "NetLab",
    "NetLabError",
    "PostgresServer",
    "ProcessFailed",
    "Role",
    "Topology",
    "accord_argv",
    "balances",
    "cleanup_stale_labs",
    "etcd_binary",
    "etcd_url",
    "free_port",
    "nats_server_binary",
    "netns_available",
    "numbered_accounts",
    "open_accounts",
    "postgres_bindir",
    "stop_all",
    "workdir",
]
