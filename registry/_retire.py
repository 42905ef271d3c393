"""Retired shards in etcd: the marker, and the outcomes kept for their idempotency keys.

The key layout is documented in :mod:`accord.registry._shard`. This module writes it
(for ``accord shard retire``, which reads the outcomes from the shard's WAL) and reads
it (for sharded clients). To it an outcome is four opaque strings (gid, state, protocol,
reason) under an idempotency key; what they mean is the coordinator's and the client's.

Writing is re-runnable: the kept outcomes are plain puts in batches (each well inside
etcd's default limits of 128 operations and 1.5 MiB per transaction), and the marker is
written last, in one transaction that checks that no coordinator owns the shard and
that its epoch is still the one read at the start. A run that stops half-way leaves the
shard not retired (clients ignore kept outcomes without a marker); running it again
finishes it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from accord.registry._etcd import _ERRORS, REQUEST_TIMEOUT_S, Etcd, _short
from accord.registry._shard import (
    Retired,
    _owner_id,
    epoch_key,
    kept_gid_key,
    kept_key_key,
    owner_key,
    retired_key,
)

#: Kept outcomes written per etcd transaction (two keys each: under 128 operations).
KEPT_BATCH = 50


class RetireRefused(Exception):
    """The shard cannot be retired now; the message says why, in one line."""


@dataclass(frozen=True, kw_only=True)
class KeptOutcome:
    """The outcome of a finished transaction of a retired shard that had an
    idempotency key: what a retry of its first request would have been told."""

    gid: str
    key: str
    state: str
    protocol: str
    reason: str = ""

    def by_key(self) -> bytes:
        return _dump(
            {"gid": self.gid, "state": self.state, "protocol": self.protocol, "reason": self.reason}
        )

    def by_gid(self) -> bytes:
        return _dump(
            {"key": self.key, "state": self.state, "protocol": self.protocol, "reason": self.reason}
        )

    @classmethod
    def parse(cls, value: bytes, *, gid: str = "", key: str = "") -> KeptOutcome | None:
        try:
            data = json.loads(value)
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("state"), str):
            return None
        return cls(
            gid=gid or str(data.get("gid", "")),
            key=key or str(data.get("key", "")),
            state=data["state"],
            protocol=str(data.get("protocol", "")),
            reason=str(data.get("reason", "")),
        )


def _dump(data: dict[str, str]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


# ---------------------------------------------------------------- reading (clients)


async def kept_for_key(
    etcd: Etcd, shards: Sequence[str], key: str, timeout_s: float = REQUEST_TIMEOUT_S
) -> tuple[str, KeptOutcome] | None:
    """The first of the retired ``shards`` (in their order) that kept an outcome for
    idempotency key ``key``, and that outcome; None when none did. One etcd round trip
    (ConnectionError when etcd cannot be reached)."""
    if not shards:
        return None
    kv = etcd.client.kv
    assert kv is not None
    try:
        resp = await kv.txn(
            compare=[],
            success=[kv.txn_op_get(kept_key_key(s, key)) for s in shards],
            timeout=timeout_s,
            max_attempts=2,
        )
    except _ERRORS as e:
        raise ConnectionError(f"etcd at {etcd.url} unreachable: {_short(e)}") from e
    for shard, r in zip(shards, resp.responses, strict=True):
        kvs = r.response_range.kvs
        if kvs:
            kept = KeptOutcome.parse(bytes(kvs[0].value), key=key)
            if kept is not None:
                return shard, kept
    return None


async def kept_for_gid(
    etcd: Etcd, shard: str, gid: str, timeout_s: float = REQUEST_TIMEOUT_S
) -> KeptOutcome | None:
    """The kept outcome of ``gid`` of retired ``shard``; None when it had no
    idempotency key (so nothing was kept). ConnectionError when etcd is unreachable."""
    kv = etcd.client.kv
    assert kv is not None
    try:
        resp = await kv.get(kept_gid_key(shard, gid), timeout=timeout_s, max_attempts=2)
    except _ERRORS as e:
        raise ConnectionError(f"etcd at {etcd.url} unreachable: {_short(e)}") from e
    return KeptOutcome.parse(bytes(resp.kvs[0].value), gid=gid) if resp.kvs else None


# ---------------------------------------------------------------- writing (accord shard retire)


@dataclass(frozen=True, kw_only=True)
class RetireStart:
    """What retiring checked first; the marker is written only if it still holds."""

    shard: str
    epoch: int
    #: The epoch key's version when read: a coordinator taking the shard changes it.
    epoch_version: int
    last_owner: str
    #: The marker, when the shard is retired already.
    retired: Retired | None = None


async def check_retirable(etcd: Etcd, shard: str) -> RetireStart:
    """RetireRefused when ``shard`` is unknown or a live coordinator owns it."""
    kv = etcd.client.kv
    assert kv is not None
    try:
        resp = await kv.txn(
            compare=[],
            success=[
                kv.txn_op_get(epoch_key(shard)),
                kv.txn_op_get(owner_key(shard)),
                kv.txn_op_get(retired_key(shard)),
            ],
            timeout=REQUEST_TIMEOUT_S,
            max_attempts=2,
        )
    except _ERRORS as e:
        raise RetireRefused(f"etcd at {etcd.url} unreachable: {_short(e)}") from e
    epoch_kvs, owner_kvs, retired_kvs = (r.response_range.kvs for r in resp.responses)
    if not epoch_kvs:
        raise RetireRefused(
            f"shard {shard} is unknown in etcd at {etcd.url} (no coordinator ever owned it)"
        )
    epoch_kv = epoch_kvs[0]
    try:
        epoch = int(epoch_kv.value)
    except ValueError:
        epoch = 0
    retired = Retired.parse(bytes(retired_kvs[0].value)) if retired_kvs else None
    if owner_kvs:
        try:
            data = json.loads(owner_kvs[0].value)
        except ValueError:
            data = None
        owner = str(data.get("id", "")) if isinstance(data, dict) else ""
        address = str(data.get("address", "")) if isinstance(data, dict) else ""
        raise RetireRefused(
            f"shard {shard} is owned by live coordinator {owner or '?'}"
            f"{' at ' + address if address else ''} (epoch {epoch}): stop it first"
        )
    last = ""
    try:
        old = await kv.get(
            owner_key(shard),
            revision=int(epoch_kv.mod_revision),
            timeout=REQUEST_TIMEOUT_S,
            max_attempts=1,
        )
        last = _owner_id(bytes(old.kvs[0].value)) if old.kvs else ""
    except _ERRORS:
        pass  # etcd's history was compacted: the last owner's name is lost, nothing else
    return RetireStart(
        shard=shard,
        epoch=epoch,
        epoch_version=int(epoch_kv.version),
        last_owner=last,
        retired=retired,
    )


async def write_kept(etcd: Etcd, shard: str, outcomes: Sequence[KeptOutcome]) -> None:
    """Writes the kept outcomes of ``shard`` (by key and by gid), :data:`KEPT_BATCH` per
    etcd transaction. Idempotent: a re-run writes the same values."""
    kv = etcd.client.kv
    assert kv is not None
    for start in range(0, len(outcomes), KEPT_BATCH):
        ops = []
        for o in outcomes[start : start + KEPT_BATCH]:
            ops.append(kv.txn_op_put(kept_key_key(shard, o.key), o.by_key()))
            ops.append(kv.txn_op_put(kept_gid_key(shard, o.gid), o.by_gid()))
        try:
            # Retried freely: the same puts again change nothing.
            await kv.txn(compare=[], success=ops, timeout=10.0, max_attempts=3)
        except _ERRORS as e:
            raise RetireRefused(
                f"etcd at {etcd.url} failed while writing the kept outcomes "
                f"({start} of {len(outcomes)} written; run the command again): {_short(e)}"
            ) from e


async def mark_retired(etcd: Etcd, start: RetireStart, marker: Retired) -> None:
    """Writes the marker, if no coordinator owns the shard and its epoch has not moved
    since :func:`check_retirable`; RetireRefused otherwise."""
    kv = etcd.client.kv
    assert kv is not None
    shard = start.shard
    value = json.dumps(marker.to_dict(), separators=(",", ":"))
    try:
        resp = await kv.txn(
            compare=[
                kv.txn_compare_create_revision(owner_key(shard), 0),
                kv.txn_compare_version(epoch_key(shard), start.epoch_version),
                kv.txn_compare_create_revision(retired_key(shard), 0),
            ],
            success=[kv.txn_op_put(retired_key(shard), value)],
            timeout=REQUEST_TIMEOUT_S,
            max_attempts=1,
        )
        succeeded = bool(resp.succeeded)
    except _ERRORS as e:
        # A doubtful answer: read the marker back (an identical one is ours).
        try:
            back = await kv.get(retired_key(shard), timeout=REQUEST_TIMEOUT_S, max_attempts=2)
        except _ERRORS:
            raise RetireRefused(
                f"etcd at {etcd.url} failed while marking shard {shard} retired "
                f"(run the command again): {_short(e)}"
            ) from e
        succeeded = bool(back.kvs) and bytes(back.kvs[0].value) == value.encode()
        if not succeeded and not back.kvs:
            raise RetireRefused(
                f"etcd at {etcd.url} failed while marking shard {shard} retired "
                f"(run the command again): {_short(e)}"
            ) from e
    if succeeded:
        return
    now = await check_retirable(etcd, shard)  # RetireRefused if it is owned now
    if now.retired is not None:
        raise RetireRefused(f"shard {shard} was retired meanwhile (by {now.retired.by})")
    raise RetireRefused(
        f"a coordinator took shard {shard} over while it was being retired "
        f"(epoch {start.epoch} -> {now.epoch}): nothing was retired"
    )
