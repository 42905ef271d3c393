"""The chaos harness's network parts without processes: which settings run together,
the owner-overlap reading of the banks' audit, the seeded fault deck, and the shard
lease's "sure to own" window."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from accord.participants._audit import AuditRow
from accord.participants._barrier import Outcome
from accord.registry._shard import ShardLease
from accord.tools.chaos import Chaos, ChaosSettings
from accord.tools.chaos._harness import _banks, validate
from accord.tools.chaos._run import overlaps_in


def _row(shard: str, epoch: int, at: float, outcome: Outcome = Outcome.PREPARED) -> AuditRow:
    return AuditRow(
        seq=0, gid="g", branch_id="b1", op="prepare", outcome=outcome, source="coordinator",
        shard=shard, epoch=epoch, coordinator_address="", detail="", at=at,
    )  # fmt: skip


def test_network_faults_need_net_and_member_faults_a_cluster() -> None:
    validate(ChaosSettings(net=True, etcd_members=3, faults=("partition", "kill-etcd-member")))
    with pytest.raises(ValueError, match="--net"):
        validate(ChaosSettings(faults=("partition",)))
    with pytest.raises(ValueError, match="--etcd-members 3"):
        validate(ChaosSettings(net=True, faults=("kill-etcd-member",)))
    with pytest.raises(ValueError, match="1, 3 or 5"):
        validate(ChaosSettings(etcd_members=2))
    with pytest.raises(ValueError, match="SQLite"):
        validate(ChaosSettings(net=True, participant_db="postgres"))


def test_an_old_owner_acting_after_a_new_one_began_is_an_overlap() -> None:
    clean = overlaps_in([_row("s1", 1, 1.0), _row("s1", 1, 2.0), _row("s1", 2, 2.5)])
    assert clean["overlap_examples"] == [] and clean["epochs_seen"] == {"s1": 2}
    # Refused as FENCED: fencing at work, not an overlap.
    fenced = overlaps_in([_row("s1", 2, 2.0), _row("s1", 1, 3.0, Outcome.FENCED)])
    assert fenced["overlap_examples"] == [] and fenced["fenced_calls"] == 1
    bad = overlaps_in([_row("s1", 1, 1.0), _row("s1", 2, 2.0), _row("s1", 1, 2.4)])
    assert len(bad["overlap_examples"]) == 1 and "epoch 1 acted until" in bad["overlap_examples"][0]
    # Other shards' epochs are independent.
    assert overlaps_in([_row("s1", 1, 3.0), _row("s2", 5, 1.0)])["overlap_examples"] == []


def test_the_net_fault_deck_deals_every_kind_once_per_round(tmp_path: Path) -> None:
    faults = ("partition", "loss", "cut-etcd", "latency")
    chaos = Chaos(ChaosSettings(net=True, faults=faults, seed=3), tmp_path, lambda _: None)
    dealt = [chaos._next_fault() for _ in range(8)]
    assert sorted(dealt[:4]) == sorted(faults) and sorted(dealt[4:]) == sorted(faults)
    again = Chaos(ChaosSettings(net=True, faults=faults, seed=3), tmp_path / "b", lambda _: None)
    assert [again._next_fault() for _ in range(8)] == dealt  # seeded
    chaos._skip("loss")
    assert chaos._next_fault() == "loss"  # a skipped fault comes back in the round
    chaos.history.close()
    again.history.close()


def test_an_operation_names_its_banks() -> None:
    assert _banks({"branches": [{"service": "a"}, {"service": "b"}]}) == {"a", "b"}
    assert _banks({"steps": [{"service": "c"}]}) == {"c"}


async def test_an_owner_is_sure_of_its_shard_only_within_a_renewal_plus_ttl_minus_margin() -> None:
    lease = ShardLease(None, "s1", owner_id="c1", ttl_s=4)  # type: ignore[arg-type]
    assert not lease.may_act()  # not owned yet
    assert lease.owned_until(100.0) == 100.0 + 4 - 1.0
    assert ShardLease(None, "s1", owner_id="c1", ttl_s=2).owned_until(0) == 2 - 0.5  # type: ignore[arg-type]
    lease._sure_until = asyncio.get_running_loop().time() + 10  # monotonic, as the lease's
    assert lease.may_act()
    lease.lost.set()
    assert not lease.may_act()
