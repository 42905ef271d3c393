"""Routing by shard: which coordinator shard a gid, or a new transaction, belongs to.

Several coordinator processes share the load by owning different WAL shards
(``--shard``). A client must then send every gid-addressed call to the shard that
made the gid, and every retry of an idempotency key to the shard that saw the first
attempt. Both are decided here, so the coordinator and the client cannot disagree.

Gid form::

    <shard>:<28 hex digits>       e.g. s1:0190c1a2b3c4deadbeef00000001   (sharded)
    <28 hex digits>                     0190c1a2b3c4deadbeef00000001     (older gids)

The hex part is unchanged (start time in ms, a random per-process prefix, a counter),
so a shard's gids still sort by time. The shard comes first, and is split off at the
last ``:``, which a shard name may not contain. A gid without a shard (made before
gids carried one) is valid everywhere; only the shard that has it knows it.

Keys are placed by rendezvous (highest random weight) hashing over the shard names:
adding or losing one of n shards moves only about 1/n of the keys, and the hash is
stable across processes and Python versions (BLAKE2b, not ``hash()``).

A shard that is gone for good is *retired* (``accord shard retire``): it stays in the
ranking, so no other key moves, and the outcomes its idempotency keys had are kept in
etcd. A key goes to the first shard of its ranking that is not retired; the retired
shards ranked above that one are asked first whether they kept an outcome for it
(:func:`place_key`). Skipping only retired shards, never merely unreachable ones,
keeps a key on one shard: a retry while that shard is down waits for it, as before.

The registry does not know about transactions: to it a gid is an opaque string with a
shard name in front.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

#: A shard name: what ``--shard`` accepts (and so what a gid can carry).
SHARD_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
GID_SEPARATOR = ":"


def check_shard_name(shard: str) -> str:
    """``shard`` if it can be a shard name; ValueError saying why not otherwise."""
    if not SHARD_NAME.match(shard):
        raise ValueError(
            f"shard name {shard!r} must be 1-64 characters of [A-Za-z0-9_.-] "
            "(it is the prefix of every gid the shard makes)"
        )
    return shard


def gid_prefix(shard: str) -> str:
    """What every gid made by ``shard`` starts with."""
    return check_shard_name(shard) + GID_SEPARATOR


def shard_of(gid: str) -> str:
    """The shard that made ``gid``; ``""`` for a gid that names none (an older one)."""
    shard, sep, _ = gid.rpartition(GID_SEPARATOR)
    return shard if sep and SHARD_NAME.match(shard) else ""


def _weight(shard: str, key: str) -> bytes:
    h = hashlib.blake2b(digest_size=8)
    h.update(shard.encode())
    h.update(b"\0")
    h.update(key.encode())
    return h.digest()


def shard_for_key(key: str, shards: Iterable[str]) -> str:
    """The shard an idempotency key belongs to among ``shards`` (rendezvous hashing);
    ValueError when there is none."""
    best = max(shards, key=lambda s: (_weight(s, key), s), default=None)
    if best is None:
        raise ValueError("no shard to place the key on")
    return best


def rank_shards(key: str, shards: Iterable[str]) -> list[str]:
    """``shards`` best first for ``key``: the first is :func:`shard_for_key`'s answer."""
    return sorted(set(shards), key=lambda s: (_weight(s, key), s), reverse=True)


@dataclass(frozen=True, slots=True)
class KeyPlacement:
    """Where a new transaction with an idempotency key goes."""

    #: The shard it runs on: the first of the key's ranking that is not retired
    #: (``""`` when every shard is retired).
    shard: str
    #: The retired shards ranked above :attr:`shard`, best first: a first attempt
    #: may have run on one of them, so their kept outcomes are looked up first.
    retired: tuple[str, ...] = ()


def place_key(key: str, shards: Iterable[str], retired: Collection[str] = ()) -> KeyPlacement:
    """The placement of ``key`` among ``shards`` (every shard ever known) when the
    shards in ``retired`` are gone for good; ValueError when there is no shard at all.
    Keys whose first-ranked shard is not retired stay where they were."""
    ranked = rank_shards(key, shards)
    if not ranked:
        raise ValueError("no shard to place the key on")
    above: list[str] = []
    for s in ranked:
        if s not in retired:
            return KeyPlacement(s, tuple(above))
        above.append(s)
    return KeyPlacement("", tuple(above))
