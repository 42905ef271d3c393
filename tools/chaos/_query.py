"""``accord chaos --query``: the run also has a query service (``accord query``,
following every shard through etcd), and at quiescence the read model is compared with
the coordinators' own view: every transaction a coordinator still holds must be in the
read model in the same state, with the same reason and idempotency key. A difference
that does not go away within :data:`CONVERGE_S` (the feed's lag) is a violation named
``read-model``. Transactions the coordinators have already forgotten (they keep a
bounded number of finished ones) are only in the read model, which is expected.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc

import accord.v1 as pb
from accord.common.transport import make_channel
from accord.tools.topology import ManagedProcess, NetHost, Topology, accord_argv

READ_MODEL = "read-model"
#: How long the read model may take to catch up with the coordinators at quiescence.
CONVERGE_S = 30.0


def start_query(
    topology: Topology, etcd_url: str, root: Path, host: NetHost | None = None
) -> ManagedProcess:
    """The query service of a chaos run (its store in ``ROOT/query.db``), on ``host``
    if given."""
    ip = host.ip if host is not None else "127.0.0.1"
    args = [
        "query",
        *("--listen", f"{ip}:0"),
        *("--db", str(root / "query.db")),
        *("--etcd", etcd_url),
        *("--http", f"{ip}:0"),
        *("--id", "chaos-query"),
    ]
    proc = topology.process("query", accord_argv(args), cert="query", host=host)
    return topology.start(proc)


async def _read_model(address: str) -> dict[str, pb.TransactionSummary]:
    out: dict[str, pb.TransactionSummary] = {}
    async with make_channel(address) as channel:
        stub = pb.QueryStub(channel)
        token = ""
        for _ in range(100_000):
            resp = await stub.ListTransactions(
                pb.QueryListRequest(page_size=1000, page_token=token), timeout=30
            )
            out.update((t.gid, t) for t in resp.transactions)
            token = resp.next_page_token
            if not token:
                break
    return out


def differences(
    model: dict[str, pb.TransactionSummary], coordinators: list[dict[str, Any]]
) -> list[dict[str, str]]:
    out = []
    for t in coordinators:
        gid = t["gid"]
        s = model.get(gid)
        if s is None:
            out.append({"gid": gid, "message": f"{gid} ({t['state']}) is not in the read model"})
            continue
        state = pb.TxnState.Name(s.state).removeprefix("TXN_STATE_")
        seen = (state, s.reason, s.idempotency_key)
        want = (t["state"], t.get("reason", ""), t.get("idempotency_key", ""))
        if seen != want:
            out.append(
                {
                    "gid": gid,
                    "message": f"{gid}: read model {seen}, coordinator {want}",
                }
            )
    return out


async def compare(
    address: str, coordinators: list[dict[str, Any]], *, converge_s: float = CONVERGE_S
) -> dict[str, Any]:
    """Waits (at most ``converge_s``) for the read model to equal the coordinators'
    final view; returns ``compared``, ``read_model`` (its size), ``waited_s`` and the
    ``violations`` left."""
    t0 = time.monotonic()
    diffs: list[dict[str, str]] = []
    model: dict[str, pb.TransactionSummary] = {}
    error = ""
    while True:
        try:
            model = await _read_model(address)
            diffs = differences(model, coordinators)
            error = ""
        except (grpc.aio.AioRpcError, OSError) as e:
            error = str(e)
            diffs = [{"gid": "", "message": f"the query service did not answer: {e}"}]
        if not diffs or time.monotonic() - t0 > converge_s:
            break
        await asyncio.sleep(0.5)
    return {
        "compared": len(coordinators),
        "read_model": len(model),
        "waited_s": round(time.monotonic() - t0, 2),
        "error": error,
        "violations": [{"name": READ_MODEL, **d} for d in diffs],
    }
