"""The read side (CQRS): ``accord query``.

It follows every shard's event feed (``Coordinator/Subscribe``), projects the events into
its own store (SQLite by default, PostgreSQL as the option), recording each shard's
applied LSN in the same store transaction as the rows it changed (exactly-once
projection), and serves ``accord.v1.Query`` over gRPC and ``/healthz`` (and the web
console) over HTTP.

Modules: ``_project`` (events -> rows, pure), ``_store`` (SQLite/PostgreSQL),
``_cursor`` (page tokens), ``_read`` (list/get/stats as SQL), ``_follow`` (one follower
per shard), ``_app`` (the backend: store + followers + changes + rebuild), ``_service``
(the gRPC edge), ``_http`` (the HTTP edge: /healthz and the web console, whose JSON is
``_console`` and whose pages are ``static/``), ``_server`` (the process).

It owns its store and nothing else: it never writes to a coordinator, a participant or
etcd (apart from its own leased registration under ``/accord/v1/query/``, and the
console's operator actions, RetryTransaction/CancelSaga, only with ``--console-actions``).
"""

from accord.query._app import QueryApp, StoreLockedError, rebuild_offline
from accord.query._backend import Health, QueryBackend, ShardHealth
from accord.query._errors import InvalidArgument, NotFound, QueryError
from accord.query._follow import parse_coordinator
from accord.query._http import BACKEND, ConsoleOptions, build_http_app
from accord.query._server import QueryServer, QuerySettings, query_key, serve
from accord.query._store import PostgresStore, SqliteStore, Store, open_store

__all__ = [
    "BACKEND",
    "ConsoleOptions",
    "Health",
    "InvalidArgument",
    "NotFound",
    "PostgresStore",
    "QueryApp",
    "QueryBackend",
    "QueryError",
    "QueryServer",
    "QuerySettings",
    "ShardHealth",
    "SqliteStore",
    "Store",
    "StoreLockedError",
    "build_http_app",
    "open_store",
    "parse_coordinator",
    "query_key",
    "rebuild_offline",
    "serve",
]
