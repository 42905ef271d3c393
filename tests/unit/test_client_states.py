"""The client SDK's transaction states: one enum, the same names as accord.v1.TxnState."""

from __future__ import annotations

import json

import accord.v1 as pb
from accord.client import FINAL_STATES, TxnResult, TxnState


def test_the_enum_is_the_protocol_s() -> None:
    assert {k.removeprefix("TXN_STATE_") for k, _ in pb.TxnState.items()} == set(TxnState)
    for state in TxnState:
        assert TxnState.from_pb(state.to_pb()) is state
    assert TxnState.from_pb(999) == "999"  # a state a newer server knows


def test_final_states() -> None:
    assert {"COMMITTED", "ABORTED", "COMPLETED", "COMPENSATED"} == FINAL_STATES
    result = TxnResult.from_pb(pb.Transaction(gid="s:1", state=pb.TXN_STATE_COMPENSATED))
    assert result.state == "COMPENSATED" and result.final and result.compensated
    assert json.loads(json.dumps(result.to_dict()))["state"] == "COMPENSATED"
    running = TxnResult.from_pb(pb.Transaction(gid="s:2", state=pb.TXN_STATE_STUCK))
    assert running.stuck and not running.final
