"""A saga definition's JSON form (``accord txn saga --file``) is accord.v1.SagaStep in
protobuf's JSON mapping, with payloads as JSON values or text."""

from __future__ import annotations

import json

import pytest

from accord.client import SagaStep


def test_every_field() -> None:
    step = SagaStep.from_dict(
        {
            "name": "give",
            "service": "bank-b",
            "action": "credit",
            "compensation": "uncredit",
            "payload": {"account": "y", "amount": 20},
            "compensation_payload": "raw text",
            "depends_on": ["take"],
            "pivot": True,
            "timeout_ms": 500,
            "retry": {
                "max_attempts": 3,
                "initial_interval_ms": 10,
                "max_interval_ms": 100,
                "multiplier": 1.5,
                "final_codes": ["NOT_FOUND"],
            },
        }
    )
    assert step == SagaStep(
        name="give",
        service="bank-b",
        action="credit",
        compensation="uncredit",
        payload=json.dumps({"account": "y", "amount": 20}, separators=(",", ":")).encode(),
        compensation_payload=b"raw text",
        depends_on=("take",),
        pivot=True,
        timeout_ms=500,
        max_attempts=3,
        initial_interval_ms=10,
        max_interval_ms=100,
        multiplier=1.5,
        final_codes=("NOT_FOUND",),
    )
    pb_step = step.to_pb()
    assert pb_step.retry.max_attempts == 3 and list(pb_step.depends_on) == ["take"]
    # protobuf's camelCase names are accepted too
    assert SagaStep.from_dict({"name": "a", "action": "x", "dependsOn": ["b"]}).depends_on == ("b",)


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "a", "action": "x", "colour": "red"},
        {"name": "a", "action": "x", "retry": {"max_attempts": "many"}},
        {"name": "a", "action": "x", "depends_on": "b"},
        ["not", "an", "object"],
    ],
)
def test_bad_steps_are_value_errors(bad: object) -> None:
    with pytest.raises(ValueError):
        SagaStep.from_dict(bad)  # type: ignore[arg-type]
