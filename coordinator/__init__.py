"""The coordinator package owns the transaction engine, its write-ahead log
(:mod:`accord.coordinator.wal`), recovery, timers, retries and the gRPC server. It
reaches participants only through the registry (:mod:`accord.registry`) and the
participant protocol, and never touches a participant's storage.

Inside: the engine (``_engine``) owns persistence, timers, the one retry loop and
idempotency, with the transaction table (``_table``), replay (``_replay``) and watchers
(``_watch``) as its parts; each protocol is a mode behind one interface (``_host.Mode``:
2PC in ``_twopc``, sagas in ``_saga``) that reaches the engine only through
``_host.Host``. The engine's API takes plain values (``_specs``); protobuf stays at the
gRPC edge (``_server``) and in the WAL records (``_records``).
"""

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
from accord.coordinator._failpoints import Failpoint, FailpointError, Failpoints
from accord.coordinator._methods import Method
from accord.coordinator._server import CoordinatorServer, ServerSettings, serve
from accord.coordinator._specs import BranchSpec, SagaSpec, StepRetry, StepSpec
from accord.coordinator._states import TRANSITIONS, BranchState, Outcome, TxnState, allowed

__all__ = [
    "TRANSITIONS",
    "AccordError",
    "AlreadyExists",
    "BranchSpec",
    "BranchState",
    "CoordinatorConfig",
    "CoordinatorServer",
    "Engine",
    "FailedPrecondition",
    "Failpoint",
    "FailpointError",
    "Failpoints",
    "IllegalTransition",
    "InvalidArgument",
    "Limits",
    "Method",
    "NotFound",
    "Outcome",
    "ResourceExhausted",
    "RetryPolicy",
    "SagaSpec",
    "ServerSettings",
    "StepRetry",
    "StepSpec",
    "Transport",
    "TxnState",
    "Unavailable",
    "allowed",
    "serve",
]
