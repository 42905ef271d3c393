"""Client-side errors: one table maps gRPC status codes to exception classes, each raised
``from`` the original RPC error."""

from __future__ import annotations

import grpc
from grpc import aio


class AccordClientError(Exception):
    """Base of every error the client SDK raises for a failed call."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(AccordClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(AccordClientError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(AccordClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExistsError(AccordClientError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhaustedError(AccordClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(AccordClientError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(AccordClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnauthenticatedError(AccordClientError):
    """No bearer token, or one the coordinator does not accept."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(AccordClientError):
    """The token is valid but its roles do not allow the call."""

    code = grpc.StatusCode.PERMISSION_DENIED


class TransactionAborted(AccordClientError):
    """Raised by ``async with client.transaction()`` when the commit ends ABORTED."""

    code = grpc.StatusCode.ABORTED


_BY_CODE: dict[grpc.StatusCode, type[AccordClientError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        FailedPreconditionError,
        AlreadyExistsError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        UnauthenticatedError,
        PermissionDeniedError,
    )
}


def from_rpc_error(e: aio.AioRpcError) -> AccordClientError:
    cls = _BY_CODE.get(e.code(), AccordClientError)
    err = cls(f"{e.code().name}: {e.details()}")
    err.code = e.code()
    return err
