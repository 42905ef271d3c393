"""The coordinator package owns the transaction engine (2PC now; sagas plug into the
same engine), its write-ahead log (:mod:`accord.coordinator.wal`), recovery, timers, retries and
the gRPC server. It reaches participants only through the registry and transport in
:mod:`registry`, and never touches a participant's storage."""

from accord.coordinator._calls import Transport
from accord.coordinator._config import CoordinatorConfig, Limits, RetryPolicy
from accord.coordinator._engine import Engine
from accord.coordinator._errors import (
    AccordError,
    AlreadyExists,
    FailedPrecondition,
    IllegalTransition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from accord.coordinator._failpoints import FailpointError, Failpoints
from accord.coordinator._server import CoordinatorServer, ServerSettings, serve
from accord.coordinator._states import TRANSITIONS, BranchState, TxnState, allowed

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
