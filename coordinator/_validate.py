"""Request validation: a malformed request is refused before anything is logged or kept."""

from __future__ import annotations

import re

import accord.v1 as pb
from coordinator._config import CoordinatorConfig, Limits
from coordinator._errors import InvalidArgument

_BRANCH_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):[0-9]{1,5}$")

__all__ = ["InvalidArgument", "check_branch", "check_branch_count", "check_key", "check_timeout"]


def check_key(key: str, limits: Limits) -> None:
    if len(key) > limits.max_key_chars:
        raise InvalidArgument(f"idempotency_key is longer than {limits.max_key_chars} characters")
    if key and not key.isprintable():
        raise InvalidArgument("idempotency_key must be printable text")


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


def check_branch(branch: pb.Branch, limits: Limits, where: str = "branch") -> None:
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
