"""The query service's domain errors; the gRPC edge (``_service``) and the HTTP edge
(the console) map them to their status codes in one place each."""

from __future__ import annotations


class QueryError(Exception):
    """Base of the errors a read can end with."""


class InvalidArgument(QueryError):
    """A malformed request: an unknown enum value, a page size over the limit, a cursor
    this service did not make (gRPC INVALID_ARGUMENT, HTTP 400)."""


class NotFound(QueryError):
    """A gid the read model has never seen (gRPC NOT_FOUND, HTTP 404)."""
