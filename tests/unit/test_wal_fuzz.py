"""WAL fuzzing: random bit flips, truncations and zeroed ranges in a closed log of known,
acknowledged records, each opened with the real recovery code.

Every outcome must be one of two:

* start-up stops with WalCorruptionError (``wal: ...``) naming the damaged file and an
  offset, and the directory is left exactly as it was; or
* start-up succeeds with every acknowledged record intact and in order, and the
  checkpoint image it reports is the one written. Records may be missing only when the
  damage looks like an interrupted write of the last segment's tail (the package's
  documented rule): the file cut short inside them, or a range of them zeroed with
  nothing valid after it. A bit flip never loses a record. A repaired log opens again
  with the same records and nothing left to repair.

Anything else (another exception, a record changed, a gap) fails the test.

The short run (``ACCORD_WAL_FUZZ_N``, default 2 000) is part of ``make test``; ``make
fuzz`` runs 100 000 and more. The seed is fixed (``ACCORD_WAL_FUZZ_SEED``), so a failure
reproduces; the failing case is printed."""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from accord.coordinator.wal import WAL, WalCorruptionError, WalRecord
from accord.coordinator.wal._recovery import recover
from tests.unit.test_wal_helpers import RTYPE, DiskRecord, read_records

SEG = 1024
N = int(os.environ.get("ACCORD_WAL_FUZZ_N", "2000"))
SEED = int(os.environ.get("ACCORD_WAL_FUZZ_SEED", "15"))
#: Every this many cases also go through ``WAL.open`` (lock, threads, an append).
FULL_OPEN_EVERY = 250


@dataclass(frozen=True)
class Template:
    files: dict[str, bytes]
    acked: list[WalRecord]
    images: dict[int, bytes]
    records: list[DiskRecord]
    last_segment: str


@dataclass(frozen=True)
class Damage:
    kind: str  # "flip", "truncate", "zero"
    file: str
    start: int
    end: int  # flip: start + 1; truncate: the new size; zero: end of the zeroed range
    bit: int = 0

    def apply(self, data: bytes) -> bytes:
        if self.kind == "flip":
            b = bytearray(data)
            b[self.start] ^= 1 << self.bit
            return bytes(b)
        if self.kind == "truncate":
            return data[: self.start]
        return data[: self.start] + bytes(self.end - self.start) + data[self.end :]


def _payload(rnd: random.Random) -> bytes:
    # Non-zero bytes: a zeroed range is never mistaken for data (see the module doc).
    return bytes(rnd.randint(1, 255) for _ in range(rnd.choice((0, 3, 17, 40, 120, 200))))


async def _write_template(
    directory: Path, rnd: random.Random
) -> tuple[list[WalRecord], dict[int, bytes]]:
    """Records appended one at a time, each synced (acknowledged) before the next, with
    two checkpoints; several 1 KiB segments (two sectors each) remain after the second."""
    acked: list[WalRecord] = []
    images: dict[int, bytes] = {}
    wal, _ = await WAL.open(directory, segment_size=SEG)
    try:
        for i in range(75):
            p = _payload(rnd)
            lsn = await wal.append(RTYPE + i % 3, p, sync=True)
            acked.append(WalRecord(lsn, RTYPE + i % 3, p))
            if i in (15, 35):
                image = f"image at {lsn}".encode() * 20
                await wal.checkpoint(image, lsn)
                images[lsn] = image
    finally:
        await wal.close()
    return acked, images


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None
    d = Path(tempfile.mkdtemp(prefix="accord-wal-fuzz-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def template(scratch: Path) -> Template:
    src = scratch / "template"
    acked, images = asyncio.run(_write_template(src, random.Random(SEED)))
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file() and p.name != "LOCK"}
    records = read_records(src)
    assert len({r.segment.name for r in records}) >= 3, "the template must span segments"
    assert sum(1 for n in files if n.endswith(".ckpt")) >= 1
    return Template(files, acked, images, records, records[-1].segment.name)


def _damage(rnd: random.Random, t: Template) -> Damage:
    names = sorted(t.files)
    # Mostly where the data is: the last segment's zeroed preallocation is most of it.
    weights = [len(t.files[n].rstrip(b"\0")) + 64 for n in names]
    name = rnd.choices(names, weights)[0]
    data = t.files[name]
    live = min(len(data), len(data.rstrip(b"\0")) + 64)
    kind = rnd.choices(("flip", "truncate", "zero"), (60, 25, 15))[0]
    if kind == "flip":
        at = rnd.randrange(live)
        return Damage("flip", name, at, at + 1, rnd.randrange(8))
    if kind == "truncate":
        return Damage("truncate", name, rnd.randrange(live + 1), 0)
    start = rnd.randrange(live)
    end = min(len(data), start + rnd.choice((1, 8, 100, 512, 4096)))
    if rnd.random() < 0.5:
        end = len(data)  # the rest of the file: what a lost tail looks like
    return Damage("zero", name, start, end)


def _lay(directory: Path, files: dict[str, bytes]) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file() and p.name != "LOCK"}


def _allowed_loss(t: Template, d: Damage, lost: list[WalRecord]) -> str | None:
    """Why losing ``lost`` is wrong, or None when it is what a torn tail repair does."""
    if d.kind == "flip":
        return "a bit flip lost acknowledged records"
    if d.file != t.last_segment:
        return f"damage in {d.file}, not the last segment, lost records"
    where = {r.lsn: r for r in t.records}
    for rec in lost:
        disk = where[rec.lsn]
        if disk.segment.name != t.last_segment:
            return f"lsn {rec.lsn} in {disk.segment.name} was lost"
        rec_end = disk.offset + disk.size
        if d.kind == "truncate" and rec_end <= d.start:
            return f"lsn {rec.lsn} ends at {rec_end}, before the cut at {d.start}"
        if d.kind == "zero" and not (disk.offset < d.end and rec_end > d.start):
            return f"lsn {rec.lsn} at {disk.offset}..{rec_end} is outside the zeroed range"
    return None


def _check_one(work: Path, t: Template, d: Damage, full_open: bool) -> str:
    """Runs one case; returns its outcome ("stopped", "intact", "repaired")."""
    damaged = dict(t.files)
    damaged[d.file] = d.apply(t.files[d.file])
    _lay(work, damaged)
    try:
        rec = recover(work, SEG)
    except WalCorruptionError as e:
        msg = str(e)
        assert msg.startswith("wal: "), msg
        assert re.search(r"[0-9a-f]{16}\.(wal|ckpt)", msg), f"no file named: {msg}"
        assert "offset" in msg or "checkpoint file" in msg, f"no offset: {msg}"
        assert _snapshot(work) == damaged, "a failed start-up changed the directory"
        return "stopped"
    ckpt = rec.checkpoint_lsn
    if ckpt:
        assert rec.checkpoint == t.images.get(ckpt), f"checkpoint image at {ckpt} differs"
    else:
        assert rec.checkpoint is None
    expected = [r for r in t.acked if r.lsn > ckpt]
    got = rec.records
    assert got == expected[: len(got)], "a recovered record differs from the one written"
    lost = expected[len(got) :]
    if lost:
        why = _allowed_loss(t, d, lost)
        assert why is None, f"silent loss: {why} (lost lsns {[r.lsn for r in lost]})"
    # The repaired directory opens again with the same records, nothing left to repair.
    again = recover(work, SEG)
    assert again.records == got and again.checkpoint_lsn == ckpt
    assert not [n for n in again.notes if "torn tail" in n], again.notes
    if full_open:
        asyncio.run(_open_and_append(work, got))
    return "repaired" if lost or rec.notes else "intact"


async def _open_and_append(work: Path, got: list[WalRecord]) -> None:
    wal, recovered = await WAL.open(work, segment_size=SEG)
    try:
        assert recovered.records == got
        lsn = await wal.append(RTYPE, b"after", sync=True)
    finally:
        await wal.close()
    wal, recovered = await WAL.open(work, segment_size=SEG)
    await wal.close()
    assert recovered.records[-1] == WalRecord(lsn, RTYPE, b"after")


def test_wal_fuzz(template: Template, scratch: Path) -> None:
    rnd = random.Random(SEED)
    work = scratch / "work"
    outcomes = {"stopped": 0, "intact": 0, "repaired": 0}
    kinds = {"flip": 0, "truncate": 0, "zero": 0}
    t0 = time.monotonic()
    for i in range(N):
        d = _damage(rnd, template)
        try:
            outcomes[_check_one(work, template, d, i % FULL_OPEN_EVERY == 0)] += 1
        except BaseException as e:
            raise AssertionError(f"case {i} (seed {SEED}): {d}: {e!r}") from e
        kinds[d.kind] += 1
    elapsed = time.monotonic() - t0
    print(f"wal fuzz: {N} cases in {elapsed:.1f} s, damage {kinds}, outcomes {outcomes}")
    # Each kind of outcome happens: the run exercises both the repair and the refusal.
    assert N < 200 or all(outcomes.values()), outcomes
