"""The coordinator package owns the transaction engine (2PC now; sagas plug into the
same engine), its write-ahead log (:mod:`coordinator.wal`), recovery, timers, retries and
the gRPC server. It reaches participants only through the registry and transport in
:mod:`registry`, and never touches a participant's storage."""

from coordinator._calls import Transport
from coordinator._config import CoordinatorConfig, Limits, RetryPolicy
from coordinator._engine import Engine
from coordinator._errors import (
    AccordError,
    AlreadyExists,
    FailedPrecondition,
    IllegalTransition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from coordinator._failpoints import FailpointError, Failpoints
from coordinator._server import CoordinatorServer, ServerSettings, serve
from coordinator._states import TRANSITIONS, BranchState, TxnState, allowed

__all__ = [
    "TRANSITIONS",
    "AccordError",
    "AlreadyExists",
    "BranchState",
    "CoordinatorConfig",
    "CoordinatorServer",
    "Engine",
    "FailedPrecondition",
    "FailpointError",
    "Failpoints",
    "IllegalTransition",
    "InvalidArgument",
    "Limits",
    "NotFound",
    "ResourceExhausted",
    "RetryPolicy",
    "ServerSettings",
    "Transport",
    "TxnState",
    "Unavailable",
    "allowed",
    "serve",
]
