"""In-memory transaction objects: the engine's view of every live and recently finished
transaction, rebuilt from the WAL on start-up. ``to_pb`` gives the wire form (the gRPC
edge and watchers use it), ``checkpoint_entry`` the records that rebuild one."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import accord.v1 as pb
from accord.coordinator._host import CallPolicy
from accord.coordinator._methods import Method
from accord.coordinator._specs import StepSpec, step_to_pb
from accord.coordinator._states import BranchState, TxnState

if TYPE_CHECKING:
    from accord.coordinator._calls import CallResult


@dataclass(kw_only=True)
class BranchRt:
    branch_id: str
    service: str
    address: str
    operation: str
    payload: bytes
    resolved: str = ""
    state: BranchState = BranchState.PENDING
    attempts: int = 0
    last_error: str = ""

    def attempted(self, method: Method) -> None:
        self.attempts += 1

    def answered(self, method: Method, result: CallResult) -> None:
        return None

    def spec(self) -> pb.Branch:
        return pb.Branch(
            service=self.service,
            address=self.address,
            operation=self.operation,
            payload=self.payload,
            branch_id=self.branch_id,
        )

    def same_spec(self, other: BranchRt) -> bool:
        return (self.service, self.address, self.operation, self.payload) == (
            other.service,
            other.address,
            other.operation,
            other.payload,
        )


@dataclass(kw_only=True)
class StepRt:
    """A saga step at run time."""

    index: int
    spec: StepSpec
    #: ``spec`` as the SAGA_START record holds it (the wire form, made once).
    wire: pb.SagaStep | None = None
    resolved: str = ""
    state: BranchState = BranchState.PENDING
    attempts: int = 0
    compensation_attempts: int = 0
    last_error: str = ""
    result: bytes = b""
    #: Steps that depend on this one (for reverse-order compensation).
    dependents: list[int] = field(default_factory=list)
    deps: list[int] = field(default_factory=list)
    #: This step or one of its ancestors is the pivot: never compensated.
    after_pivot: bool = False
    #: The span of the action or compensation in progress (tracing on only).
    span: Any = None
    #: The retry policies of the action and of the compensation (made on first use).
    policies: tuple[CallPolicy, CallPolicy] | None = None
    #: Attempts of the action, in its current run, that may have reached the
    #: participant: sent, or still in flight (1 for a start found in the WAL after a
    #: restart: what it sent then is unknown). 0 when every one certainly was not sent.
    reached: int = 0

    @property
    def service(self) -> str:
        return self.spec.service

    @property
    def address(self) -> str:
        return self.spec.address

    def attempted(self, method: Method) -> None:
        if method is Method.COMPENSATE:
            self.compensation_attempts += 1
        else:
            self.attempts += 1
            self.reached += 1  # in flight: it may reach the participant

    def answered(self, method: Method, result: CallResult) -> None:
        if method is not Method.COMPENSATE and not result.sent:
            self.reached -= 1

    def to_pb(self) -> pb.StepStatus:
        return pb.StepStatus(
            step=self.wire if self.wire is not None else step_to_pb(self.spec),
            state=int(self.state),  # type: ignore[arg-type]
            attempts=self.attempts,
            compensation_attempts=self.compensation_attempts,
            last_error=self.last_error,
            result=self.result,
            resolved_address=self.resolved,
        )


@dataclass(kw_only=True, eq=False)
class Txn:
    gid: str
    protocol: int = pb.PROTOCOL_TWO_PHASE_COMMIT
    key: str = ""
    digest: bytes = b""
    #: Who started it (a token's caller id; "" when auth is off or in older logs:
    #: anyone's). Its idempotency key is this caller's own.
    caller: str = ""
    created_ms: int = 0
    deadline_ms: int = 0
    state: TxnState = TxnState.ACTIVE
    #: The state a transition in flight is making durable (== state when none is).
    claimed: TxnState = TxnState.ACTIVE
    branches: list[BranchRt] = field(default_factory=list)
    reason: str = ""
    lsn: int = 0
    one_phase: bool = False
    #: The records that rebuild this transaction (for checkpoints).
    rec_begin: pb.WalBegin | None = None
    rec_prepare: pb.WalPrepare | None = None
    rec_commit: pb.WalCommit | None = None
    rec_abort: pb.WalAbort | None = None
    rec_end: pb.WalEnd | None = None
    #: Sagas: the steps, and the records that rebuild them.
    steps: list[StepRt] = field(default_factory=list)
    rec_saga: pb.WalSagaStart | None = None
    rec_steps: dict[int, pb.WalSagaStep] = field(default_factory=dict)
    rec_saga_state: pb.WalSagaState | None = None
    #: Set once the transaction reaches a final state.
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when the outcome is decided (COMMITTING/ABORTING or final).
    decided: asyncio.Event = field(default_factory=asyncio.Event)
    abort_requested: asyncio.Event = field(default_factory=asyncio.Event)
    #: Sagas: wakes the forward loop (a step ended, or CancelSaga).
    wake: asyncio.Event | None = None
    watchers: list[asyncio.Queue[pb.TransactionEvent | None]] = field(default_factory=list)
    driver: asyncio.Task[None] | None = None
    expiry: asyncio.TimerHandle | None = None
    #: Telemetry (coordinator/_telemetry.py): the root span and the current 2PC phase's
    #: span (None when tracing is off), the root's W3C traceparent as logged in the WAL,
    #: and when this process started driving it (for the latency histogram).
    span: Any = None
    phase_span: Any = None
    traceparent: str = ""
    started_ns: int = 0

    def branch(self, branch_id: str) -> BranchRt | None:
        for b in self.branches:
            if b.branch_id == branch_id:
                return b
        return None

    def to_pb(self) -> pb.Transaction:
        return pb.Transaction(
            gid=self.gid,
            protocol=self.protocol,  # type: ignore[arg-type]
            state=int(self.state),  # type: ignore[arg-type]
            branches=[
                pb.BranchStatus(
                    branch=b.spec(),
                    state=int(b.state),  # type: ignore[arg-type]
                    attempts=b.attempts,
                    last_error=b.last_error,
                    resolved_address=b.resolved,
                )
                for b in self.branches
            ],
            idempotency_key=self.key,
            created_unix_ms=self.created_ms,
            deadline_unix_ms=self.deadline_ms,
            reason=self.reason,
            lsn=self.lsn,
            one_phase=self.one_phase,
            steps=[st.to_pb() for st in self.steps],
        )

    def checkpoint_entry(self) -> pb.CheckpointTxn:
        entry = pb.CheckpointTxn()
        if self.rec_begin is not None:
            entry.begin.CopyFrom(self.rec_begin)
        if self.rec_prepare is not None:
            entry.prepare.CopyFrom(self.rec_prepare)
        if self.rec_commit is not None:
            entry.commit.CopyFrom(self.rec_commit)
        if self.rec_abort is not None:
            entry.abort.CopyFrom(self.rec_abort)
        if self.rec_end is not None:
            entry.end.CopyFrom(self.rec_end)
        if self.rec_saga is not None:
            entry.saga.CopyFrom(self.rec_saga)
            entry.steps.extend(self.rec_steps[i] for i in sorted(self.rec_steps))
        if self.rec_saga_state is not None:
            entry.saga_state.CopyFrom(self.rec_saga_state)
        return entry
