"""The clients package owns everything that calls Accord from outside: the client SDK
(async first, a sync wrapper), the ``accord`` command line, the demo, and (later) the
load generator and the chaos harness. It talks to coordinators only over gRPC."""

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
    ResourceExhaustedError,
    TransactionAborted,
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
    "ResourceExhaustedError",
    "SagaStep",
    "StepResult",
    "SyncAccordClient",
    "Transaction",
    "TransactionAborted",
    "TxnResult",
    "TxnState",
    "UnavailableError",
]
