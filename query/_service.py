"""The gRPC edge: ``accord.v1.Query`` handlers only translate to and from the backend,
and one table maps the backend's errors to status codes. An unexpected exception is
INTERNAL with the traceback logged, never sent. With auth on, every call needs a token
with the reader (or admin) role (``accord.common.auth``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc
from grpc import aio

import accord.v1 as pb
from accord.common.auth import Authenticator, PermissionDenied, Role, Unauthenticated
from accord.query._backend import QueryBackend
from accord.query._errors import InvalidArgument, NotFound, QueryError

log = logging.getLogger("accord.query")

T = TypeVar("T")

_STATUS: dict[type[QueryError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
}


async def _guard(context: aio.ServicerContext[Any, Any], work: Awaitable[T]) -> T:
    try:
        return await work
    except QueryError as e:
        await context.abort(_STATUS.get(type(e), grpc.StatusCode.INTERNAL), str(e))
    except (asyncio.CancelledError, aio.AbortError):
        raise
    except Exception:
        log.exception("event=internal_error")
        await context.abort(
            grpc.StatusCode.INTERNAL, "internal error (see the query service's log)"
        )
    raise AssertionError("unreachable")


async def check_reader(context: aio.ServicerContext[Any, Any], auth: Authenticator | None) -> None:
    """Ends the call (UNAUTHENTICATED / PERMISSION_DENIED) unless its token holds the
    reader or admin role; nothing is logged."""
    if auth is None:
        return
    try:
        auth.from_metadata(context.invocation_metadata()).require(Role.READER)
    except Unauthenticated as e:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
    except PermissionDenied as e:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))


class QueryServicer(pb.QueryServicer):
    def __init__(self, backend: QueryBackend, *, auth: Authenticator | None = None) -> None:
        self._b = backend
        self._auth = auth

    async def ListTransactions(
        self, request: pb.QueryListRequest, context: Any
    ) -> pb.QueryListResponse:
        await check_reader(context, self._auth)
        return await _guard(context, self._b.list(request))

    async def GetTransaction(self, request: pb.QueryGetRequest, context: Any) -> pb.TransactionView:
        await check_reader(context, self._auth)
        return await _guard(context, self._b.get(request.gid))

    async def Stats(self, request: pb.StatsRequest, context: Any) -> pb.StatsResponse:
        await check_reader(context, self._auth)
        return await _guard(context, self._b.stats(request))
