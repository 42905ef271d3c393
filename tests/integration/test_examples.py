"""The README's client and participant examples, run for real: the inventory example
participant and a bank behind a coordinator, the checkout example as the client. The
README must quote the example files verbatim, so what it shows is what is tested."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from accord.client.examples.checkout import checkout, checkout_interactive
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster, balances, open_accounts

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [
    ROOT / "participants/examples/inventory.py",
    ROOT / "participants/examples/inventory_pg.py",
    ROOT / "clients/examples/checkout.py",
]


def test_readme_quotes_the_examples_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    for path in EXAMPLES:
        assert path.read_text() in blocks, f"README does not quote {path.name} verbatim"


async def test_checkout_example(cluster: Cluster) -> None:
    bank = cluster.bank("bank")
    await open_accounts(bank.address, {"alice": 60})
    inventory = cluster.topology.process(
        "inventory",
        [
            sys.executable,
            "-m",
            "accord.participants.examples.inventory",
            "127.0.0.1:0",
            str(cluster.root / "inv.db"),
        ],
    )
    cluster.topology.start(inventory)
    coord = cluster.coordinator({"bank": bank.address, "inventory": inventory.address})
    assert await checkout(coord.address, "1")
    assert await checkout(coord.address, "1")  # the retry is the same order: paid once
    assert await asyncio.to_thread(checkout_interactive, coord.address, "2")
    # alice has 10 left: the third order is refused by the bank, and the widget is put back.
    assert not await checkout(coord.address, "3")
    b = await assert_eventually(lambda: balances(bank.address), lambda r: r.prepared_branches == 0)
    assert b.total == 10
    import sqlite3

    def stock() -> tuple[int, int]:
        with sqlite3.connect(cluster.root / "inv.db") as conn:
            row = conn.execute("SELECT free, held FROM stock WHERE item = 'widget'").fetchone()
            return int(row[0]), int(row[1])

    assert await assert_eventually(lambda: asyncio.to_thread(stock), lambda s: s == (1, 0))
