"""The client SDK (``accord.client``): how a service runs 2PC transactions and sagas on
Accord. Async first (:class:`AccordClient`), with a synchronous wrapper
(:class:`SyncAccordClient`); results are plain frozen dataclasses, transaction states a
:class:`TxnState`, errors one exception class per gRPC status.

It talks to coordinators only over gRPC, and imports nothing at import time beyond
grpcio, protobuf and opentelemetry-api (tests/unit/test_sdk_deps.py checks it): the
command line, the demo, the load generator and the chaos harness are in
:mod:`accord.tools`."""

from accord.client._client import (
    AccordClient,
    Branch,
    BranchResult,
    SagaStep,
    StepResult,
    Transaction,
    TxnResult,
)
from accord.client._errors import (
    AccordClientError,
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TransactionAborted,
    UnauthenticatedError,
    UnavailableError,
)
from accord.client._states import FINAL_STATES, TxnState
from accord.client._sync import SyncAccordClient

__all__ = [
    "FINAL_STATES",
    "AccordClient",
    "AccordClientError",
    "AlreadyExistsError",
    "Branch",
    "BranchResult",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "SagaStep",
    "StepResult",
    "SyncAccordClient",
    "Transaction",
    "TransactionAborted",
    "TxnResult",
    "TxnState",
    "UnauthenticatedError",
    "UnavailableError",
]
