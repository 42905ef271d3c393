"""Gid ↔ shard routing (common/gid.py) and the coordinator's side of it."""

from __future__ import annotations

from collections import Counter

import pytest

from accord.common.gid import check_shard_name, gid_prefix, shard_for_key, shard_of
from accord.coordinator import CoordinatorConfig, Engine, FailedPrecondition, NotFound, RetryPolicy
from accord.coordinator._specs import BranchSpec
from accord.coordinator._states import Outcome
from accord.registry import (
    CoordinatorInfo,
    shard_map,
)
from tests.unit._fakes import FakeCalls, FakeClock, FakeWal

OLD_GID = "0190c1a2b3c4deadbeef00000001"


def test_a_gid_names_its_shard_and_old_gids_name_none() -> None:
    assert shard_of("s1:0190c1a2b3c4deadbeef00000001") == "s1"
    assert shard_of("coord.east-2:0190c1a2b3c4deadbeef00000001") == "coord.east-2"
    assert shard_of(OLD_GID) == ""
    assert shard_of("") == ""
    assert shard_of(":abc") == ""  # an empty shard name is no shard
    assert shard_of("a b:abc") == ""  # nor is one a shard could not be called


def test_shard_names_a_gid_cannot_carry_are_refused() -> None:
    assert gid_prefix("s1") == "s1:"
    for bad in ("", "a:b", "a b", "x" * 65, "s/1"):
        with pytest.raises(ValueError, match="shard name"):
            check_shard_name(bad)


def test_keys_stay_on_their_shard_and_spread_over_all() -> None:
    shards = ["s1", "s2", "s3"]
    placed = {f"order-{i}": shard_for_key(f"order-{i}", shards) for i in range(3000)}
    # Stable: the order the shards are given in does not matter.
    assert all(shard_for_key(k, list(reversed(shards))) == s for k, s in placed.items())
    counts = Counter(placed.values())
    assert set(counts) == set(shards) and min(counts.values()) > 800
    # Losing a shard moves only its own keys (rendezvous hashing).
    moved = [k for k, s in placed.items() if s != "s3" and shard_for_key(k, ["s1", "s2"]) != s]
    assert moved == []
    with pytest.raises(ValueError):
        shard_for_key("k", [])


def test_the_shard_map_keeps_the_newest_owner_and_every_known_shard() -> None:
    m = shard_map(
        [
            CoordinatorInfo(coordinator_id="c1", address="a:1", shard="s1", epoch=1),
            CoordinatorInfo(coordinator_id="c2", address="a:2", shard="s1", epoch=2),
            CoordinatorInfo(coordinator_id="c3", address="a:3", shard="s2", epoch=1),
        ],
        ["s1", "s2", "s3"],
    )
    assert {s: c.coordinator_id for s, c in m.owners.items()} == {"s1": "c2", "s2": "c3"}
    assert m.known == ("s1", "s2", "s3")  # s3 has no live owner but keeps its keys


def engine(shard: str) -> Engine:
    config = CoordinatorConfig(
        shard=shard, retry=RetryPolicy(initial_s=0.001, max_s=0.002), phase_two_wait_s=1.0
    )
    return Engine(wal=FakeWal(), calls=FakeCalls(), config=config, clock=FakeClock())


def two_branches() -> list[BranchSpec]:
    return [
        BranchSpec(service="bank-a", operation="debit", payload=b"1"),
        BranchSpec(service="bank-b", operation="credit", payload=b"1"),
    ]


async def test_the_engine_makes_gids_of_its_shard() -> None:
    e = engine("s7")
    txn = await e.execute(key="", timeout_ms=0, branches=two_branches())
    assert shard_of(txn.gid) == "s7"
    assert len(txn.gid) == len("s7:") + 28
    assert e.get(txn.gid) is txn


async def test_another_shards_gid_is_refused_naming_its_shard() -> None:
    e = engine("s1")
    gid = "s2:" + OLD_GID
    with pytest.raises(
        FailedPrecondition, match="belongs to shard s2; this coordinator owns shard s1"
    ):
        e.get(gid)
    # A participant asking the wrong coordinator is not told "aborted".
    with pytest.raises(FailedPrecondition, match="shard s2"):
        e.query_outcome(gid)
    # Its own unknown gids, and gids without a shard, are simply unknown.
    for unknown in ("s1:" + OLD_GID, OLD_GID, "not-a-gid"):
        with pytest.raises(NotFound):
            e.get(unknown)
    assert e.query_outcome("s1:" + OLD_GID) == Outcome.ABORTED
