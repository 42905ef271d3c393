"""Registry values and the coordinator's routing over instances (fast tier; the etcd
behaviour itself is tested against a real etcd in tests/integration)."""

from __future__ import annotations

import grpc
import pytest

import accord.v1 as pb
from accord.coordinator._calls import CallResult, ParticipantCalls, Verdict
from accord.coordinator._methods import Method
from accord.registry import (
    StaticRegistry,
    coordinator_value,
    dialable,
    parse_coordinators,
    parse_endpoints,
    service_key,
    service_value,
)
from accord.registry._etcd import COORDINATORS, parse_services


def test_parse_endpoints() -> None:
    assert parse_endpoints("http://127.0.0.1:2379") == ["127.0.0.1:2379"]
    assert parse_endpoints("http://a:1, http://b:2") == ["a:1", "b:2"]
    assert parse_endpoints("127.0.0.1:2379") == ["127.0.0.1:2379"]
    assert parse_endpoints("https://a:1") == ["a:1"]  # TLS: see test_transport_tls.py
    for bad in ("", "grpc://a:1", "http://nohost", ",", "http://a:1,https://b:2"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)


def test_wildcard_addresses_are_not_registered() -> None:
    assert dialable("127.0.0.1:7070") == "127.0.0.1:7070"
    assert dialable("bank-a:7101") == "bank-a:7101"
    for wildcard in ("0.0.0.0:7070", "[::]:7070", ":7070"):
        with pytest.raises(ValueError, match="--advertise"):
            dialable(wildcard)


def test_parse_services_groups_sorts_and_skips_malformed() -> None:
    items = {
        service_key("bank", "b2"): service_value("127.0.0.1:2", ["debit"], "1.0"),
        service_key("bank", "b1"): service_value("127.0.0.1:1"),
        service_key("trip", "t1"): service_value("127.0.0.1:3"),
        service_key("bank", "junk"): b"{not json",
        service_key("bank", "noaddr"): b'{"operations": []}',
        "/accord/v1/services/no-instance": service_value("127.0.0.1:9"),
    }
    services = parse_services(items)
    assert [i.instance_id for i in services["bank"]] == ["b1", "b2"]
    assert services["bank"][1].operations == ("debit",)
    assert services["bank"][1].version == "1.0"
    assert [i.address for i in services["trip"]] == ["127.0.0.1:3"]
    assert set(services) == {"bank", "trip"}


def test_parse_coordinators() -> None:
    infos = parse_coordinators(
        {
            COORDINATORS + "c1": coordinator_value("127.0.0.1:7070", "s1", 3),
            COORDINATORS + "bad": b"[]",
        }
    )
    assert [(c.coordinator_id, c.address, c.shard, c.epoch) for c in infos] == [
        ("c1", "127.0.0.1:7070", "s1", 3)
    ]


class ScriptedCalls(ParticipantCalls):
    """Answers by address instead of sending (the routing is what is under test)."""

    def __init__(self, registry: StaticRegistry, down: set[str]) -> None:
        super().__init__(registry=registry)
        self.down = down
        self.sent: list[str] = []

    async def call(
        self,
        method: str,
        address: str,
        request: pb.BranchRequest,
        attempt_s: float,
        *,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> CallResult:
        self.sent.append(address)
        if address in self.down:
            return CallResult(Verdict.RETRY, code=grpc.StatusCode.UNAVAILABLE)
        return CallResult(Verdict.OK)


REQ = pb.BranchRequest(gid="g", branch_id="b1")


async def test_routing_spreads_sticks_and_fails_over() -> None:
    reg = StaticRegistry({"bank": ["h:1", "h:2", "h:3"]})
    calls = ScriptedCalls(reg, down=set())
    # New branches are spread round robin.
    assert {calls.resolve("bank", "") for _ in range(3)} == {"h:1", "h:2", "h:3"}
    # A branch keeps to its instance while it answers.
    for _ in range(3):
        result, nxt = await calls.send(Method.PREPARE, "bank", "", "h:2", REQ, 1.0)
        assert result.verdict == Verdict.OK and nxt == "h:2"
    # UNAVAILABLE: the next attempt goes to another instance.
    calls.down = {"h:2"}
    result, nxt = await calls.send(Method.COMMIT, "bank", "", "h:2", REQ, 1.0)
    assert result.code == grpc.StatusCode.UNAVAILABLE and nxt in {"h:1", "h:3"}
    result, nxt2 = await calls.send(Method.COMMIT, "bank", "", nxt, REQ, 1.0)
    assert result.verdict == Verdict.OK and nxt2 == nxt
    # An instance no longer registered is left for a live one.
    result, nxt = await calls.send(Method.COMMIT, "bank", "", "h:9", REQ, 1.0)
    assert calls.sent[-1] in {"h:1", "h:2", "h:3"}


async def test_routing_with_a_direct_address_or_no_instance() -> None:
    calls = ScriptedCalls(StaticRegistry({"bank": ["h:1", "h:2"]}), down={"x:1"})
    result, nxt = await calls.send(Method.PREPARE, "bank", "x:1", "x:1", REQ, 1.0)
    assert nxt == "x:1", "a direct address is never replaced"
    empty = ScriptedCalls(StaticRegistry({}), down=set())
    result, nxt = await empty.send(Method.PREPARE, "ghost", "", "", REQ, 1.0)
    assert result.verdict == Verdict.RETRY and result.code == grpc.StatusCode.UNAVAILABLE
    assert "no live instance of participant service 'ghost'" in result.detail
    assert empty.sent == []
    # The last address used is still tried when the registry knows nothing right now.
    result, nxt = await empty.send(Method.COMMIT, "ghost", "", "h:7", REQ, 1.0)
    assert empty.sent == ["h:7"] and result.verdict == Verdict.OK
