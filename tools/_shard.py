"""``accord shard``: list the shards a sharded deployment knows, and retire one for good.

Retiring reads the shard's WAL the way a restarting coordinator would, without changing
it: it takes the directory's lock (so no coordinator can start on it meanwhile), copies
the segments and checkpoint files aside (sparsely: preallocated zeros take no space) and
recovers and replays the copy. It refuses while a coordinator owns the shard, and while
any transaction in the log is unfinished (only a coordinator may finish one). Otherwise
it keeps, in etcd, the outcome of every finished transaction that had an idempotency
key, then marks the shard retired (the etcd side and its layout:
:mod:`accord.registry._retire`, :mod:`accord.registry._shard`).

This module sits on top of both the coordinator (its WAL and replay) and the registry,
as the tools do; neither of them knows about the other's part.
"""

from __future__ import annotations

import asyncio
import datetime
import getpass
import os
import re
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import accord.v1 as pb
from accord.common.gid import shard_of
from accord.registry import (
    Etcd,
    KeptOutcome,
    Retired,
    RetireRefused,
    ShardMap,
    check_retirable,
    find_shards,
    mark_retired,
    write_kept,
)

if TYPE_CHECKING:
    from accord.coordinator import Method
    from accord.coordinator._calls import CallResult
    from accord.coordinator.wal._lock import DirectoryLock

#: The WAL's files that recovery reads (see accord.coordinator.wal): segments and
#: checkpoint images. Nothing else is copied.
_WAL_FILES = re.compile(r"^(?:[0-9a-f]{16}\.wal|checkpoint-[0-9a-f]{16}\.ckpt)$")
_CHUNK = 1 << 20


@dataclass(frozen=True, kw_only=True)
class WalContents:
    """What a shard's WAL holds, replayed as a coordinator would at start-up."""

    #: Finished transactions still held (a coordinator keeps the newest
    #: ``retain_finished`` of them, and every unfinished one).
    finished: int
    #: The outcomes of the finished ones that had an idempotency key.
    kept: list[KeptOutcome]
    #: gid -> state of every unfinished transaction (STUCK sagas included).
    unfinished: dict[str, str]
    #: Shards other than the expected one that gids in the log name.
    foreign: set[str] = field(default_factory=set)
    #: Repairs recovery made to the copy (a torn tail, ...), for the report.
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class RetireReport:
    shard: str
    wal_dir: str
    retired: Retired
    #: True when the shard was retired already (nothing was written this time).
    already: bool = False

    def to_dict(self) -> dict[str, object]:
        return {
            "shard": self.shard,
            "wal_dir": self.wal_dir,
            "already_retired": self.already,
            **self.retired.to_dict(),
        }


def _copy_sparse(src: Path, dst: Path) -> None:
    """A copy whose all-zero megabytes are holes: a preallocated 64 MiB segment with a
    few records costs a few pages."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = 0
        while chunk := fin.read(_CHUNK):
            if chunk.count(0) == len(chunk):
                fout.seek(len(chunk), os.SEEK_CUR)
            else:
                fout.write(chunk)
            size += len(chunk)
        fout.truncate(size)


def read_wal(directory: Path, shard: str) -> WalContents:
    """Replays ``directory`` (whose lock the caller holds) without changing it.

    Raises RetireRefused when it holds no WAL, or a damaged one."""
    # Private names of the WAL package: it has no read-only open of its own (yet).
    from accord.coordinator import CoordinatorConfig, Engine
    from accord.coordinator.wal import WalCorruptionError
    from accord.coordinator.wal._recovery import recover

    names = sorted(p.name for p in directory.iterdir() if _WAL_FILES.match(p.name))
    if not any(n.endswith(".wal") for n in names):
        raise RetireRefused(
            f"{directory} holds no WAL segments: is it the --wal-dir of shard {shard}?"
        )
    with tempfile.TemporaryDirectory(prefix="accord-retire-") as tmp:
        copy = Path(tmp)
        for name in names:
            _copy_sparse(directory / name, copy / name)
        try:
            # A segment size of 1: never grow the copy's last segment back to its
            # preallocation (nothing is appended to it).
            recovery = recover(copy, 1)
        except WalCorruptionError as e:
            raise RetireRefused(f"cannot read the WAL in {directory}: {e}") from None
    engine = Engine(wal=_NoWal(), calls=_NoCalls(), config=CoordinatorConfig(shard=shard))
    engine.replay(recovery.checkpoint, [(r.lsn, r.rtype, r.payload) for r in recovery.records])
    finished = [t for t in engine.table.all() if t.state.final]
    return WalContents(
        finished=len(finished),
        kept=[
            KeptOutcome(
                gid=t.gid,
                key=t.key,
                state=t.state.name,
                protocol=pb.Protocol.Name(t.protocol).removeprefix("PROTOCOL_"),  # type: ignore[arg-type]
                reason=t.reason,
            )
            for t in sorted(finished, key=lambda t: t.gid)
            if t.key
        ],
        unfinished={t.gid: t.state.name for t in engine.table.unfinished()},
        foreign={s for t in engine.table.all() if (s := shard_of(t.gid)) and s != shard},
        notes=list(recovery.notes),
    )


def _by() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


async def retire(shard: str, etcd_url: str, wal_dir: Path) -> RetireReport:
    """Retires ``shard`` (see the module docstring); RetireRefused says why not."""
    async with Etcd(etcd_url) as etcd:
        start = await check_retirable(etcd, shard)
        if start.retired is not None:
            return RetireReport(
                shard=shard, wal_dir=str(wal_dir), retired=start.retired, already=True
            )
        lock = await asyncio.to_thread(_lock, wal_dir)
        try:
            wal = await asyncio.to_thread(read_wal, wal_dir, shard)
            if wal.foreign:
                raise RetireRefused(
                    f"{wal_dir} holds transactions of shard(s) {', '.join(sorted(wal.foreign))}, "
                    f"not only of {shard!r}: is it the shard's --wal-dir?"
                )
            if wal.unfinished:
                stuck = sum(s == "STUCK" for s in wal.unfinished.values())
                also = f", {stuck} of them STUCK sagas (accord txn retry)" if stuck else ""
                raise RetireRefused(
                    f"shard {shard} has {len(wal.unfinished)} unfinished transactions{also}: "
                    "start a coordinator on it to finish them, then retire it"
                )
            await write_kept(etcd, shard, wal.kept)
            marker = Retired(
                at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                by=_by(),
                transactions=wal.finished,
                kept=len(wal.kept),
                epoch=start.epoch,
                last_owner=start.last_owner,
            )
            await mark_retired(etcd, start, marker)
        finally:
            lock.release()
    return RetireReport(shard=shard, wal_dir=str(wal_dir), retired=marker)


def _lock(wal_dir: Path) -> DirectoryLock:
    """The WAL directory's lock: no coordinator can open the WAL while it is held."""
    from accord.coordinator.wal import WalLockedError
    from accord.coordinator.wal._lock import DirectoryLock

    if not wal_dir.is_dir():
        raise RetireRefused(f"WAL directory {wal_dir} does not exist")
    try:
        return DirectoryLock.acquire(wal_dir)
    except WalLockedError as e:
        raise RetireRefused(f"{e} (is a coordinator running on it?)") from None


async def list_shards(etcd_url: str) -> ShardMap:
    """Every known shard's state (ConnectionError when etcd cannot be reached)."""
    return await find_shards(etcd_url)


class _NoWal:
    """Replay appends nothing; anything that tries is a bug here."""

    @property
    def last_lsn(self) -> int:
        return 0

    def submit(self, rtype: int, payload: bytes, *, sync: bool) -> tuple[int, asyncio.Future[None]]:
        raise RuntimeError("the WAL is read-only while a shard is retired")

    async def checkpoint(self, image: bytes, lsn: int) -> None:
        raise RuntimeError("the WAL is read-only while a shard is retired")


class _NoCalls:
    """Replay calls no participant."""

    def resolve(self, service: str, address: str) -> str:
        return address

    def known(self, service: str) -> bool:
        return False

    def describe(self) -> str:
        return "none (retiring a shard)"

    async def send(
        self,
        method: Method,
        service: str,
        address: str,
        current: str,
        request: pb.BranchRequest,
        attempt_s: float,
        *,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> tuple[CallResult, str]:
        raise RuntimeError("no participant is called while a shard is retired")
