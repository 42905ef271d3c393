"""Placement with retired shards (common/gid.py ``place_key``), the shard map's view of
them (registry ``shard_map``), and the sharded client's routing on top: keyed, keyless,
kept outcomes, and the message for a shard without an owner. etcd is faked here (the
kept-outcome look-ups); tests/integration/test_shard_retire.py runs the real thing."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import accord.registry
from accord.client import AccordClient, Branch, SagaStep
from accord.client._errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    UnavailableError,
)
from accord.common.gid import KeyPlacement, place_key, rank_shards, shard_for_key
from accord.registry import CoordinatorInfo, KeptOutcome, Retired, shard_map

SHARDS = ["s1", "s2", "s3"]
KEYS = [f"order-{i}" for i in range(3000)]


def test_the_ranking_starts_with_the_keys_shard_whatever_the_order() -> None:
    for key in KEYS[:200]:
        ranked = rank_shards(key, SHARDS)
        assert sorted(ranked) == SHARDS and ranked[0] == shard_for_key(key, SHARDS)
        assert rank_shards(key, list(reversed(SHARDS))) == ranked


def test_without_retired_shards_placement_is_unchanged() -> None:
    for key in KEYS:
        assert place_key(key, SHARDS) == KeyPlacement(shard_for_key(key, SHARDS))


def test_a_retired_shards_keys_go_to_the_next_of_their_ranking_and_no_other_key_moves() -> None:
    moved: Counter[str] = Counter()
    for key in KEYS:
        before = shard_for_key(key, SHARDS)
        p = place_key(key, SHARDS, retired={"s2"})
        if before == "s2":
            # Asked first (its kept outcome), then the next shard of the key's ranking:
            # the same as ranking the shards that are not retired.
            assert p.retired == ("s2",)
            assert p.shard == rank_shards(key, SHARDS)[1] == shard_for_key(key, ["s1", "s3"])
            moved[p.shard] += 1
        else:
            assert p == KeyPlacement(before), key
    assert set(moved) == {"s1", "s3"} and min(moved.values()) > 300  # spread, not piled


def test_every_retired_shard_ranked_above_is_asked_in_rank_order() -> None:
    for key in KEYS[:300]:
        ranked = rank_shards(key, SHARDS)
        p = place_key(key, SHARDS, retired={"s1", "s3"})
        assert p.shard == "s2"
        assert p.retired == tuple(ranked[: ranked.index("s2")])
    everything = place_key("k", SHARDS, retired=set(SHARDS))
    assert everything.shard == "" and everything.retired == tuple(rank_shards("k", SHARDS))
    with pytest.raises(ValueError):
        place_key("k", [])


def test_the_shard_map_names_retired_shards_and_serves_only_the_others() -> None:
    m = shard_map(
        [
            CoordinatorInfo(coordinator_id="c2", address="a:2", shard="s2", epoch=4),
            CoordinatorInfo(coordinator_id="c3", address="a:3", shard="s3", epoch=1),
            # Someone started a coordinator on a retired shard: live, but serves nothing new.
            CoordinatorInfo(coordinator_id="c9", address="a:9", shard="s9", epoch=2),
        ],
        ["s1", "s2", "s3", "s4", "s9"],
        epochs={"s1": 3, "s2": 4, "s3": 1, "s4": 7, "s9": 2},
        retired={"s1": Retired(at="t", by="me", kept=5, last_owner="c1"), "s9": Retired()},
        owner_ids={"s4": "c4"},
    )
    assert m.known == ("s1", "s2", "s3", "s4", "s9")
    assert m.retired == {"s1", "s9"} and m.serving == ("s2", "s3")
    s1, s4 = m.states["s1"], m.states["s4"]
    assert (s1.owner, s1.epoch, s1.live, s1.retired is not None) == ("c1", 3, False, True)
    assert (s4.owner, s4.epoch, s4.live, s4.retired) == ("c4", 7, False, None)
    assert m.states["s2"].to_dict() == {
        "shard": "s2",
        "epoch": 4,
        "owner": "c2",
        "address": "a:2",
        "live": True,
        "retired": None,
    }


def test_markers_and_kept_outcomes_read_back() -> None:
    assert Retired.parse(b"not json") == Retired()  # still marks the shard retired
    r = Retired(at="2026-01-01T00:00:00+00:00", by="ops@h", transactions=9, kept=4, epoch=3)
    assert Retired.parse(json.dumps(r.to_dict()).encode()) == r
    k = KeptOutcome(gid="s1:01", key="order-1", state="COMMITTED", protocol="TWO_PHASE_COMMIT")
    assert KeptOutcome.parse(k.by_key(), key="order-1") == k
    assert KeptOutcome.parse(k.by_gid(), gid="s1:01") == k
    assert KeptOutcome.parse(b"[]") is None


# ---------------------------------------------------------------- the client's routing


class _Stub:
    """A coordinator that remembers which shard each call reached."""

    def __init__(self, shard: str, seen: list[str]) -> None:
        self.shard, self.seen = shard, seen

    async def Execute(self, req: Any, **_: Any) -> Any:
        import accord.v1 as pb

        self.seen.append(self.shard)
        return pb.TransactionResponse(
            transaction=pb.Transaction(
                gid=f"{self.shard}:new",
                state=pb.TXN_STATE_COMMITTED,
                idempotency_key=req.idempotency_key,
            )
        )


class _Conn:
    def __init__(self, stub: _Stub) -> None:
        self.stub, self.address = stub, f"addr-{stub.shard}"


def sharded(live: list[str], known: list[str], retired: set[str], seen: list[str]) -> AccordClient:
    m = shard_map(
        [
            CoordinatorInfo(coordinator_id=f"c-{s}", address=f"a:{s}", shard=s, epoch=1)
            for s in live
        ],
        known,
        epochs={s: 2 for s in known},
        retired={s: Retired() for s in retired},
        owner_ids={s: f"old-{s}" for s in known if s not in live},
    )
    c = AccordClient("", connect=False)
    c._sharded, c._etcd = True, "http://127.0.0.1:2379"
    c._conns = {s: _Conn(_Stub(s, seen)) for s in live}  # type: ignore[misc]
    c._live, c._known, c._serving = tuple(live), m.known, m.serving
    c._retired, c._states = m.retired, m.states
    c._map_at = time.monotonic() + 3600  # never re-read in these tests
    c._etcd_client = object()  # type: ignore[assignment]
    return c


def two_branches() -> list[Branch]:
    return [Branch(service="a", operation="debit"), Branch(service="b", operation="credit")]


@pytest.fixture
def kept(monkeypatch: pytest.MonkeyPatch) -> dict[str, KeptOutcome]:
    """The kept outcomes of retired shards, by key and by gid (a faked etcd)."""
    store: dict[str, KeptOutcome] = {}

    async def for_key(etcd: object, shards: Any, key: str) -> Any:
        for s in shards:
            if f"{s}/{key}" in store:
                return s, store[f"{s}/{key}"]
        return None

    async def for_gid(etcd: object, shard: str, gid: str) -> Any:
        return store.get(f"{shard}/gid/{gid}")

    monkeypatch.setattr(accord.registry, "kept_for_key", for_key)
    monkeypatch.setattr(accord.registry, "kept_for_gid", for_gid)
    return store


async def test_keyless_transactions_skip_retired_shards(kept: dict[str, KeptOutcome]) -> None:
    seen: list[str] = []
    client = sharded(["s2", "s3"], SHARDS, {"s3"}, seen)
    for _ in range(6):
        await client.execute(two_branches())
    assert set(seen) == {"s2"}


async def test_a_key_first_ranked_on_a_retired_shard(kept: dict[str, KeptOutcome]) -> None:
    seen: list[str] = []
    client = sharded(["s2", "s3"], SHARDS, {"s1"}, seen)
    old, new = [k for k in KEYS if shard_for_key(k, SHARDS) == "s1"][:2]
    kept[f"s1/{old}"] = KeptOutcome(
        gid="s1:old", key=old, state="COMMITTED", protocol="TWO_PHASE_COMMIT"
    )
    kept["s1/gid/s1:old"] = kept[f"s1/{old}"]
    # Kept: answered from etcd, no coordinator called.
    r = await client.execute(two_branches(), idempotency_key=old)
    assert (r.gid, r.state, r.idempotency_key, seen) == ("s1:old", "COMMITTED", old, [])
    assert (await client.begin(idempotency_key=old)).gid == "s1:old"
    assert (await client.get("s1:old")).committed
    assert (await client.commit("s1:old")).committed  # as a coordinator reports a decided one
    with pytest.raises(FailedPreconditionError, match="retired"):
        await client.abort("s1:old")
    with pytest.raises(AlreadyExistsError, match="different request"):
        await client.start_saga([SagaStep(name="a", action="x", service="a")], idempotency_key=old)
    with pytest.raises(NotFoundError, match="shard 's1' was retired"):
        await client.get("s1:nokey")
    # Not kept: the next shard of its ranking.
    r = await client.execute(two_branches(), idempotency_key=new)
    assert seen == [place_key(new, SHARDS, {"s1"}).shard]


async def test_a_shard_without_owner_says_what_to_do(kept: dict[str, KeptOutcome]) -> None:
    seen: list[str] = []
    client = sharded(["s2", "s3"], SHARDS, set(), seen)
    key = next(k for k in KEYS if shard_for_key(k, SHARDS) == "s1")
    with pytest.raises(UnavailableError) as e:
        await client.execute(two_branches(), idempotency_key=key)
    assert str(e.value) == (
        "UNAVAILABLE: no live coordinator owns shard 's1' (last owner old-s1, epoch 2): start "
        "one (accord coordinator --shard s1 --wal-dir ... --etcd http://127.0.0.1:2379), or "
        "retire the shard (accord shard retire s1 --etcd http://127.0.0.1:2379 --wal-dir ...)"
    )
    # Its keys wait for it: never placed on another shard while it is merely down.
    assert seen == []
    # Once every shard is retired, a key that no shard kept has nowhere to go.
    client = sharded([], SHARDS, set(SHARDS), seen)
    with pytest.raises(UnavailableError, match="no shard that is not retired is left"):
        await client.execute(two_branches(), idempotency_key=key)


# ---------------------------------------------------------------- reading a WAL to retire


async def test_retiring_reads_a_wal_as_a_restart_would_and_changes_nothing(tmp_path: Path) -> None:
    from accord.coordinator import CoordinatorConfig, Engine
    from accord.coordinator._specs import BranchSpec
    from accord.coordinator.wal import WAL
    from accord.registry import RetireRefused
    from accord.tools._shard import _copy_sparse, read_wal
    from tests.unit._fakes import FakeCalls

    with pytest.raises(RetireRefused, match="holds no WAL segments"):
        read_wal(tmp_path, "s1")
    wal, _ = await WAL.open(tmp_path / "wal", segment_size=1 << 20)
    engine = Engine(wal=wal, calls=FakeCalls(), config=CoordinatorConfig(shard="s1"))
    branches = [BranchSpec(service="a", operation="debit", payload=b"1")]
    done = await engine.execute(key="order-1", timeout_ms=0, branches=branches)
    await engine.execute(key="", timeout_ms=0, branches=branches)
    open_one = await engine.begin(key="order-2", timeout_ms=60_000)
    await engine.close()
    await wal.close()

    files = {p.name: p.read_bytes() for p in (tmp_path / "wal").iterdir() if p.name != "LOCK"}
    contents = read_wal(tmp_path / "wal", "s1")
    assert contents.finished == 2
    assert contents.kept == [
        KeptOutcome(gid=done.gid, key="order-1", state="COMMITTED", protocol="TWO_PHASE_COMMIT")
    ]
    assert contents.unfinished == {open_one.gid: "ACTIVE"}
    assert contents.foreign == set()
    assert {
        p.name: p.read_bytes() for p in (tmp_path / "wal").iterdir() if p.name != "LOCK"
    } == files
    # The log of another shard is not this one's.
    assert read_wal(tmp_path / "wal", "s9").foreign == {"s1"}
    # The sparse copy is the same bytes.
    seg = next(p for p in (tmp_path / "wal").iterdir() if p.suffix == ".wal")
    _copy_sparse(seg, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == seg.read_bytes()
