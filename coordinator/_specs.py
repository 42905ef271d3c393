"""What a client asks the engine for, as plain typed values.

The engine's API takes these, never protobuf messages: the gRPC edge
(:mod:`accord.coordinator._server`) converts requests with the ``*_from_pb`` functions
here. The WAL keeps its records as protobuf (wal.proto, the on-disk format); the
``*_to_pb`` functions serve the records, and the request digests that idempotency keys
are checked against (so a digest stays what it was for the same request).
"""

from __future__ import annotations

from dataclasses import dataclass

import accord.v1 as pb


@dataclass(frozen=True, kw_only=True, slots=True)
class BranchSpec:
    """A 2PC branch: a participant (a registry service, or a direct address), the
    operation to run there and its payload; ``branch_id`` "" means ``b<n>``."""

    service: str = ""
    address: str = ""
    operation: str = ""
    payload: bytes = b""
    branch_id: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class StepRetry:
    """A saga step's retry policy; 0 / empty means the coordinator's default."""

    initial_interval_ms: int = 0
    multiplier: float = 0.0
    max_interval_ms: int = 0
    max_attempts: int = 0
    #: gRPC status code names that fail the step for good (as ABORTED does).
    final_codes: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class StepSpec:
    """A saga step: an action and its compensation on one participant."""

    name: str
    service: str = ""
    address: str = ""
    action: str = ""
    compensation: str = ""
    payload: bytes = b""
    #: Sent with the compensation; empty: the action's payload.
    compensation_payload: bytes = b""
    depends_on: tuple[str, ...] = ()
    #: None: the coordinator's default policy.
    retry: StepRetry | None = None
    timeout_ms: int = 0
    pivot: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class SagaSpec:
    steps: tuple[StepSpec, ...]


# ---------------------------------------------------------------------- protobuf


def branch_from_pb(b: pb.Branch) -> BranchSpec:
    return BranchSpec(
        service=b.service,
        address=b.address,
        operation=b.operation,
        payload=b.payload,
        branch_id=b.branch_id,
    )


def branch_to_pb(b: BranchSpec) -> pb.Branch:
    return pb.Branch(
        service=b.service,
        address=b.address,
        operation=b.operation,
        payload=b.payload,
        branch_id=b.branch_id,
    )


def step_from_pb(st: pb.SagaStep) -> StepSpec:
    r = st.retry
    retry = None
    if st.HasField("retry"):
        retry = StepRetry(
            initial_interval_ms=r.initial_interval_ms,
            multiplier=r.multiplier,
            max_interval_ms=r.max_interval_ms,
            max_attempts=r.max_attempts,
            final_codes=tuple(r.final_codes),
        )
    return StepSpec(
        name=st.name,
        service=st.service,
        address=st.address,
        action=st.action,
        compensation=st.compensation,
        payload=st.payload,
        compensation_payload=st.compensation_payload,
        depends_on=tuple(st.depends_on),
        retry=retry,
        timeout_ms=st.timeout_ms,
        pivot=st.pivot,
    )


def step_to_pb(st: StepSpec) -> pb.SagaStep:
    r = st.retry
    out = pb.SagaStep(
        name=st.name,
        service=st.service,
        address=st.address,
        action=st.action,
        compensation=st.compensation,
        payload=st.payload,
        compensation_payload=st.compensation_payload,
        depends_on=st.depends_on,
        timeout_ms=st.timeout_ms,
        pivot=st.pivot,
    )
    if r is not None:
        # Present exactly when the request had it: the request digest an idempotency
        # key is checked against depends on it.
        out.retry.CopyFrom(
            pb.RetryPolicy(
                initial_interval_ms=r.initial_interval_ms,
                multiplier=r.multiplier,
                max_interval_ms=r.max_interval_ms,
                max_attempts=r.max_attempts,
                final_codes=r.final_codes,
            )
        )
    return out


def saga_from_pb(d: pb.SagaDefinition) -> SagaSpec:
    return SagaSpec(steps=tuple(step_from_pb(st) for st in d.steps))


def saga_to_pb(d: SagaSpec) -> pb.SagaDefinition:
    return pb.SagaDefinition(steps=[step_to_pb(st) for st in d.steps])
