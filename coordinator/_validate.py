"""Request validation: a malformed request is refused before anything is logged or kept.
It checks the plain values the engine takes (:mod:`accord.coordinator._specs`)."""

from __future__ import annotations

import re

from accord.coordinator._config import CoordinatorConfig, Limits
from accord.coordinator._errors import InvalidArgument
from accord.coordinator._specs import BranchSpec, SagaSpec, StepRetry

_BRANCH_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):[0-9]{1,5}$")

__all__ = [
    "InvalidArgument",
    "check_branch",
    "check_branch_count",
    "check_key",
    "check_reason",
    "check_saga",
    "check_timeout",
]


def check_key(key: str, limits: Limits) -> None:
    if len(key) > limits.max_key_chars:
        raise InvalidArgument(f"idempotency_key is longer than {limits.max_key_chars} characters")
    if key and not key.isprintable():
        raise InvalidArgument("idempotency_key must be printable text")


def check_reason(reason: str, limits: Limits) -> None:
    if len(reason) > limits.max_reason_chars:
        raise InvalidArgument(f"reason is longer than {limits.max_reason_chars} characters")


def check_timeout(timeout_ms: int, config: CoordinatorConfig) -> int:
    if timeout_ms == 0:
        return config.default_timeout_ms
    if timeout_ms > config.limits.max_timeout_ms:
        raise InvalidArgument(
            f"timeout_ms {timeout_ms} is over the limit of {config.limits.max_timeout_ms}"
        )
    return timeout_ms


def check_branch_count(n: int, limits: Limits) -> None:
    if n == 0:
        raise InvalidArgument("branches: at least one branch is needed")
    if n > limits.max_branches:
        raise InvalidArgument(f"branches: {n} branches, the limit is {limits.max_branches}")


def check_branch(branch: BranchSpec, limits: Limits, where: str = "branch") -> None:
    if bool(branch.service) == bool(branch.address):
        raise InvalidArgument(f"{where}: give exactly one of service and address")
    if branch.service and (
        len(branch.service) > limits.max_name_chars or not _NAME.match(branch.service)
    ):
        raise InvalidArgument(f"{where}: service {branch.service!r} is not a valid service name")
    if branch.address:
        m = _ADDRESS.match(branch.address)
        if m is None or not 0 < int(branch.address.rsplit(":", 1)[1]) < 65536:
            raise InvalidArgument(f"{where}: address {branch.address!r} is not host:port")
    if not branch.operation:
        raise InvalidArgument(f"{where}: operation is required")
    if len(branch.operation) > limits.max_name_chars or not _NAME.match(branch.operation):
        raise InvalidArgument(f"{where}: operation {branch.operation!r} is not a valid name")
    if len(branch.payload) > limits.max_payload_bytes:
        raise InvalidArgument(
            f"{where}: payload is {len(branch.payload)} bytes, the limit is {limits.max_payload_bytes}"
        )
    if branch.branch_id and not _BRANCH_ID.match(branch.branch_id):
        raise InvalidArgument(
            f"{where}: branch_id {branch.branch_id!r} must be 1-64 characters of [A-Za-z0-9_.-]"
        )


_STATUS_NAMES = frozenset(
    {
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)


def check_saga(definition: SagaSpec, config: CoordinatorConfig) -> list[bool]:
    """A saga definition: named steps, each a valid branch target, a DAG of
    dependencies, at most one pivot, and a compensation for every step that may have to
    be undone (every step that is not the pivot or after it)."""
    limits = config.limits
    steps = definition.steps
    if not steps:
        raise InvalidArgument("steps: at least one step is needed")
    if len(steps) > limits.max_steps:
        raise InvalidArgument(f"steps: {len(steps)} steps, the limit is {limits.max_steps}")
    names: dict[str, int] = {}
    pivots = 0
    for i, st in enumerate(steps):
        where = f"steps[{i}]"
        if not _BRANCH_ID.match(st.name):
            raise InvalidArgument(
                f"{where}: name {st.name!r} must be 1-64 characters of [A-Za-z0-9_.-]"
            )
        if st.name in names:
            raise InvalidArgument(f"{where}: duplicate step name {st.name!r}")
        names[st.name] = i
        check_branch(
            BranchSpec(
                service=st.service, address=st.address, operation=st.action, payload=st.payload
            ),
            limits,
            where,
        )
        if st.compensation and (
            len(st.compensation) > limits.max_name_chars or not _NAME.match(st.compensation)
        ):
            raise InvalidArgument(f"{where}: compensation {st.compensation!r} is not a valid name")
        if len(st.compensation_payload) > limits.max_payload_bytes:
            raise InvalidArgument(
                f"{where}: compensation_payload is over {limits.max_payload_bytes} bytes"
            )
        if st.timeout_ms > limits.max_timeout_ms:
            raise InvalidArgument(f"{where}: timeout_ms is over {limits.max_timeout_ms}")
        r = st.retry or StepRetry()
        if (
            r.max_attempts > 1000
            or r.max_interval_ms > limits.max_timeout_ms
            or r.initial_interval_ms > limits.max_timeout_ms
        ):
            raise InvalidArgument(
                f"{where}: retry policy out of range (max_attempts <= 1000, intervals <= {limits.max_timeout_ms} ms)"
            )
        if r.multiplier and not 1.0 <= r.multiplier <= 10.0:
            raise InvalidArgument(f"{where}: retry multiplier must be between 1 and 10")
        if len(r.final_codes) > limits.max_final_codes:
            raise InvalidArgument(
                f"{where}: {len(r.final_codes)} final_codes, the limit is {limits.max_final_codes}"
            )
        for code in r.final_codes:
            if code not in _STATUS_NAMES:
                raise InvalidArgument(f"{where}: {code!r} is not a gRPC status code name")
        pivots += st.pivot
    if pivots > 1:
        raise InvalidArgument("a saga has at most one pivot step")
    for i, st in enumerate(steps):
        if len(set(st.depends_on)) != len(st.depends_on):
            raise InvalidArgument(f"steps[{i}] ({st.name}): depends_on names a step twice")
        for dep in st.depends_on:
            if dep not in names:
                raise InvalidArgument(f"steps[{i}] ({st.name}): depends on unknown step {dep!r}")
            if dep == st.name:
                raise InvalidArgument(f"steps[{i}] ({st.name}): depends on itself")
    order = topological_order(definition)
    after = after_pivot(definition, order)
    for i, st in enumerate(steps):
        if not after[i] and not st.compensation:
            raise InvalidArgument(
                f"steps[{i}] ({st.name}): a compensation is required for every step before the pivot"
            )
    return after


def topological_order(definition: SagaSpec) -> list[int]:
    """Step indices in dependency order; INVALID_ARGUMENT names a cycle."""
    names = {st.name: i for i, st in enumerate(definition.steps)}
    state = [0] * len(definition.steps)  # 0 new, 1 on the path, 2 done
    order: list[int] = []

    def visit(i: int, path: list[str]) -> None:
        if state[i] == 2:
            return
        if state[i] == 1:
            cycle = [*path[path.index(definition.steps[i].name) :], definition.steps[i].name]
            raise InvalidArgument(f"the steps form a cycle: {' -> '.join(cycle)}")
        state[i] = 1
        for dep in definition.steps[i].depends_on:
            visit(names[dep], [*path, definition.steps[i].name])
        state[i] = 2
        order.append(i)

    for i in range(len(definition.steps)):
        visit(i, [])
    return order


def after_pivot(definition: SagaSpec, order: list[int]) -> list[bool]:
    """Whether each step is the pivot or depends (transitively) on it."""
    names = {st.name: i for i, st in enumerate(definition.steps)}
    after = [False] * len(definition.steps)
    for i in order:  # dependencies first
        st = definition.steps[i]
        after[i] = st.pivot or any(after[names[d]] for d in st.depends_on)
    return after
