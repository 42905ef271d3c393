"""NetHost and Fault without the kernel (the lab itself: tests/integration/test_netns.py)."""

from __future__ import annotations

import os

import pytest

from accord.tools.topology import Fault, NetHost, netns_available


def test_a_host_runs_commands_in_its_namespace_and_gives_its_addresses() -> None:
    h = NetHost(name="etcd1", ns="acc123456-etcd1", ip="10.213.7.3")
    assert h.argv(["etcd", "--name", "x"]) == [
        "ip",
        "netns",
        "exec",
        "acc123456-etcd1",
        "etcd",
        "--name",
        "x",
    ]
    assert h.addr(2379) == "10.213.7.3:2379"


def test_a_fault_heals_once() -> None:
    calls: list[int] = []
    f = Fault("partition", ("a", "b"), lambda: calls.append(1))
    f.heal()
    f.heal()
    assert calls == [1] and f.healed


def test_without_root_netns_available_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert netns_available() == "network namespaces need root (this runs as uid 1000)"
