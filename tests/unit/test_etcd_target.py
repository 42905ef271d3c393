"""How an etcd URL's endpoints become the gRPC target the etcd client dials."""

from __future__ import annotations

import socket

import pytest

from accord.common.exits import StartupError
from accord.registry._etcd import channel_target


def test_addresses_and_localhost_are_dialled_as_ipv4_literals() -> None:
    assert channel_target(["127.0.0.1:2379"]) == "ipv4:127.0.0.1:2379"
    assert channel_target(["localhost:1", "10.0.0.2:2"]) == "ipv4:127.0.0.1:1,10.0.0.2:2"


def test_one_host_name_goes_through_grpc_dns_resolution() -> None:
    assert channel_target(["etcd:2379"]) == "dns:///etcd:2379"


def test_several_names_are_resolved_once_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    def getaddrinfo(host: str, port: int, *args: object) -> list[tuple[object, ...]]:
        assert host == "etcd-0"
        return [(socket.AF_INET, 1, 6, "", ("10.0.0.7", port))] * 2

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert channel_target(["etcd-0:2379", "10.0.0.2:2379"]) == "ipv4:10.0.0.7:2379,10.0.0.2:2379"


def test_a_name_that_does_not_resolve_is_a_startup_error() -> None:
    with pytest.raises(StartupError, match=r"cannot resolve 'no-such-host\.invalid'"):
        channel_target(["no-such-host.invalid:1", "10.0.0.2:2"])
