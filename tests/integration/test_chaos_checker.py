"""The chaos checker on a real run: a coordinator and two bank participants (real
processes), a concurrent workload of transfers and sagas (some refused for lack of
funds, some sagas compensating), a participant SIGKILLed and restarted mid-run, the
history written with :class:`HistoryWriter`, then the offline checker on copies of the
databases: zero violations."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

from accord.client import AccordClient, AccordClientError, TxnResult
from accord.participants import copy_database
from accord.tools.chaos import (
    HistoryWriter,
    SagaStepSpec,
    TransferBranch,
    check,
    saga_request,
    transfer_request,
)
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, balances, open_accounts

ACCOUNTS = 3
INITIAL = {f"bank-{b}-{i}": 100 for b in (1, 2) for i in range(ACCOUNTS)}
UNSETTLED = ["ACTIVE", "PREPARING", "COMMITTING", "ABORTING", "RUNNING", "COMPENSATING"]
RETRY = {"max_attempts": 50, "initial_interval_ms": 20, "max_interval_ms": 200}


def transfer(rng: random.Random) -> list[TransferBranch]:
    src, dst = rng.sample([1, 2], 2) if rng.random() < 0.8 else ([1, 1])
    a, b = rng.sample(range(ACCOUNTS), 2)
    amount = rng.randint(1, 60)  # sometimes more than is left: a no vote
    return [
        TransferBranch(
            service=f"bank-{src}",
            branch_id="from",
            operation="debit",
            account=f"bank-{src}-{a}",
            amount=amount,
        ),
        TransferBranch(
            service=f"bank-{dst}",
            branch_id="to",
            operation="credit",
            account=f"bank-{dst}-{b}",
            amount=amount,
        ),
    ]


def saga(rng: random.Random) -> list[SagaStepSpec]:
    """debit → credit → credit, the last one sometimes to an unknown account (refused:
    the saga compensates the credit, then the debit)."""
    amount = rng.randint(1, 40)
    half = amount // 2
    last = "bank-2-nope" if rng.random() < 0.4 else f"bank-2-{rng.randrange(ACCOUNTS)}"
    return [
        SagaStepSpec(
            name="take",
            service="bank-1",
            action="debit",
            compensation="refund",
            account=f"bank-1-{rng.randrange(ACCOUNTS)}",
            amount=amount,
        ),
        SagaStepSpec(
            name="give",
            service="bank-2",
            action="credit",
            compensation="uncredit",
            account=f"bank-2-{rng.randrange(ACCOUNTS)}",
            amount=amount - half,
            depends_on=("take",),
        ),
        SagaStepSpec(
            name="give-rest",
            service="bank-2",
            action="credit",
            compensation="uncredit",
            account=last,
            amount=half or 1,
            depends_on=("give",),
        ),
    ]


async def all_transactions(client: AccordClient) -> list[TxnResult]:
    out: list[TxnResult] = []
    token = ""
    while True:
        page, token = await client.list(limit=500, page_token=token)
        out.extend(page)
        if not token:
            return out


async def test_checker_finds_nothing_wrong_in_a_real_run(cluster: Cluster, tmp_path: Path) -> None:
    banks = {name: cluster.bank(name, in_doubt_after_s=2.0) for name in ("bank-1", "bank-2")}
    for name, proc in banks.items():
        await open_accounts(proc.address, {k: v for k, v in INITIAL.items() if k.startswith(name)})
    services = {name: proc.address for name, proc in banks.items()}
    coordinator = cluster.coordinator(services)
    history = HistoryWriter(tmp_path / "history.jsonl")

    async with AccordClient(coordinator.address, timeout_s=20) as client:

        async def worker(process: int) -> None:
            rng = random.Random(f"chaos-checker-{process}")  # each worker's ops are fixed
            for i in range(12):
                key = f"p{process}-{i}"
                if rng.random() < 0.35:
                    steps = saga(rng)
                    history.invoke(process, "saga", key, saga_request(steps))
                    try:
                        result = await client.start_saga(
                            [s.to_client(**RETRY) for s in steps], idempotency_key=key
                        )
                    except AccordClientError as err:
                        history.error(process, "saga", key, err)
                    else:
                        history.result(process, "saga", key, result)
                else:
                    branches = transfer(rng)
                    history.invoke(process, "transfer", key, transfer_request(branches))
                    try:
                        result = await client.execute(
                            [b.to_client() for b in branches], idempotency_key=key
                        )
                    except AccordClientError as err:
                        history.error(process, "transfer", key, err)
                    else:
                        history.result(process, "transfer", key, result)

        async def nemesis() -> None:
            await asyncio.sleep(0.4)
            port = int(banks["bank-2"].address.rsplit(":", 1)[1])
            await asyncio.to_thread(banks["bank-2"].kill)
            history.fault("kill", "bank-2", {"signal": "SIGKILL"})
            await asyncio.sleep(0.3)
            banks["bank-2"] = await asyncio.to_thread(
                cluster.bank, "bank-2", port=port, in_doubt_after_s=2.0
            )
            history.fault("restart", "bank-2")

        await asyncio.gather(nemesis(), *(worker(p) for p in range(4)))
        history.fault("heal", "all")
        healed = time.monotonic()

        async def settled() -> bool:
            unsettled, _ = await client.list(states=UNSETTLED, limit=10)
            prepared = [(await balances(p.address)).prepared_branches for p in banks.values()]
            return not unsettled and not any(prepared)

        await assert_eventually(settled, bool, timeout_s=30, what="quiescence")
        history.quiescent(after_heal_s=time.monotonic() - healed)
        final = [t.to_dict() for t in await all_transactions(client)]
    history.close()
    for proc in banks.values():
        proc.stop()
    copies = {
        name: copy_database(tmp_path / f"{name}.db", tmp_path / "copies" / f"{name}.db")
        for name in banks
    }
    (tmp_path / "coordinator.json").write_text(json.dumps(final))

    report = check(
        tmp_path / "history.jsonl",
        databases=copies,
        initial=INITIAL,
        coordinator_state=final,
        recovery_bound_s=30.0,
    )
    print(json.dumps(report.stats))  # shown when the test fails
    assert report.valid, json.dumps([v.to_dict() for v in report.violations], indent=1)[:6000]
    stats = report.stats
    assert stats["operations"] == 48
    assert stats["outcomes"]["ok"] > 10
    assert stats["faults"] == {"heal": 1, "kill": 1, "restart": 1}
    assert stats["audit_rows"] > 100
    outcomes = stats["transaction_outcomes"]
    assert outcomes.get("committed", 0) > 0 and outcomes.get("completed", 0) > 0, outcomes
    assert outcomes.get("compensated", 0) > 0, outcomes
