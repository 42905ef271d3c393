"""A record reported durable survives the process being killed (real process, SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from accord.coordinator.wal import WAL

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from accord.coordinator._failpoints import Failpoints
    from accord.coordinator.wal import WAL

    async def main() -> None:
        wal, recovered = await WAL.open(
            Path(sys.argv[1]), segment_size=8192, failpoints=Failpoints.from_env()
        )
        print("ready", len(recovered.records), flush=True)

        async def worker(w: int) -> None:
            n = 0
            while True:
                payload = b"w%d-n%d" % (w, n) * (1 + n % 7)
                lsn = await wal.append(16, payload, sync=True)
                print(lsn, payload.hex(), flush=True)  # acknowledged as durable
                n += 1

        await asyncio.gather(*(worker(w) for w in range(8)))

    asyncio.run(main())
    """
)


def _run_child(directory: Path, *, kill_after: int | None, env: dict[str, str]) -> dict[int, bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory)],
        stdout=subprocess.PIPE,
        env={**os.environ, **env},
        text=True,
    )
    assert proc.stdout is not None
    acked: dict[int, bytes] = {}
    assert proc.stdout.readline().startswith("ready")
    for line in proc.stdout:
        lsn, payload = line.split()
        acked[int(lsn)] = bytes.fromhex(payload)
        if kill_after is not None and len(acked) == kill_after:
            os.kill(proc.pid, signal.SIGKILL)  # mid-stream: appends are still in flight
    assert proc.wait(timeout=30) == -signal.SIGKILL
    return acked


async def _check(directory: Path, acked: dict[int, bytes]) -> None:
    wal, recovered = await WAL.open(directory, segment_size=8192)
    found = {r.lsn: r.payload for r in recovered.records}
    missing = sorted(set(acked) - set(found))
    assert not missing, f"acknowledged but lost: {missing[:10]}"
    assert all(found[lsn] == payload for lsn, payload in acked.items())
    # The LSNs found are contiguous and new appends follow them.
    assert sorted(found) == list(range(1, len(found) + 1))
    assert await wal.append(16, b"after", sync=True) == len(found) + 1
    await wal.close()


async def test_acknowledged_records_survive_sigkill(tmp_path: Path) -> None:
    acked = _run_child(tmp_path, kill_after=400, env={})
    assert len(acked) >= 400
    await _check(tmp_path, acked)
    # Once more on the same directory: recovery, then another kill.
    acked2 = _run_child(tmp_path, kill_after=200, env={})
    assert min(acked2) > max(acked)
    await _check(tmp_path, {**acked, **acked2})


async def test_crash_at_an_fsync_failpoint(tmp_path: Path) -> None:
    """The process dies right before its 31st fdatasync: every record acknowledged
    before that is on disk."""
    acked = _run_child(
        tmp_path, kill_after=None, env={"ACCORD_FAILPOINTS": "wal_fsync=crash-after:30"}
    )
    assert acked
    await _check(tmp_path, acked)
