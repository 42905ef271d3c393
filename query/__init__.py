"""The read side (CQRS): ``accord query``.

It follows every shard's event feed (``Coordinator/Subscribe``), projects the events into
its own store (SQLite by default, PostgreSQL as the option), recording each shard's
applied LSN in the same store transaction as the rows it changed (exactly-once
projection), and serves ``accord.v1.Query`` over gRPC and ``/healthz`` (and the web
console) over HTTP.

It owns its store and nothing else: it never writes to a coordinator, a participant or
etcd (apart from its own leased registration under ``/accord/v1/query/``).
"""

from accord.query._backend import Health, QueryBackend, ShardHealth
from accord.query._errors import InvalidArgument, NotFound, QueryError

__all__ = [
    "Health",
    "InvalidArgument",
    "NotFound",
    "QueryBackend",
    "QueryError",
    "ShardHealth",
]
