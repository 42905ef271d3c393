"""`accord bank` against a real bank participant: opening accounts (idempotent), reading
balances as text and JSON, finding the bank through etcd, and bad input refused in one
line with exit code 2 before anything is sent."""

from __future__ import annotations

import json

from tests.integration.conftest import Cluster, balances
from tests.integration.test_cli import accord


async def test_open_accounts_and_balances(cluster: Cluster) -> None:
    bank = cluster.bank("bank-a")
    opened = accord("bank", "open-accounts", bank.address, "alice=100", "bob=0", "--json")
    assert json.loads(opened.stdout) == {"created": 2, "existing": 0}
    # Again, with another amount: the existing account is left as it is.
    again = accord("bank", "open-accounts", bank.address, "alice=5", "carol=7")
    assert again.stdout.strip() == "created 1, already existed 1 (left unchanged)"
    got = await balances(bank.address)
    assert {a.id: a.balance for a in got.accounts} == {"alice": 100, "bob": 0, "carol": 7}

    every = accord("bank", "balances", bank.address, "--json")
    assert json.loads(every.stdout) == {"alice": 100, "bob": 0, "carol": 7}
    some = accord("bank", "balances", bank.address, "alice", "carol", "--json")
    assert json.loads(some.stdout) == {"alice": 100, "carol": 7}
    text = accord("bank", "balances", bank.address).stdout.splitlines()
    assert text[0].split() == ["ACCOUNT", "BALANCE", "HELD"]
    assert text[1].split() == ["alice", "100", "0"]
    assert text[-1].startswith("total 107 in 3 accounts")

    missing = accord("bank", "balances", bank.address, "alice", "nobody", check=False)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.strip() == f"error: bank at {bank.address}: no account nobody"


async def test_bad_input_is_one_line_exit_2_and_opens_nothing(cluster: Cluster) -> None:
    bank = cluster.bank("bank-a")
    for bad, says in (
        ("alice", "expected NAME=AMOUNT"),
        ("alice=ten", "whole number"),
        ("alice=1.5", "whole number"),
        ("alice=-3", ">= 0"),
        ("=3", "expected NAME=AMOUNT"),
    ):
        out = accord("bank", "open-accounts", bank.address, "ok=1", bad, check=False)
        assert out.returncode == 2, (bad, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and says in out.stderr, (bad, out.stderr)
    twice = accord("bank", "open-accounts", bank.address, "a=1", "a=2", check=False)
    assert twice.returncode == 2 and "named twice: a" in twice.stderr
    by_name = accord("bank", "balances", "bank-a", check=False)
    assert by_name.returncode == 2 and "--etcd" in by_name.stderr
    assert (await balances(bank.address)).count == 0
    gone = accord("bank", "balances", "127.0.0.1:9", check=False)
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr
    assert len(gone.stderr.strip().splitlines()) == 1


async def test_the_bank_found_through_etcd(cluster: Cluster) -> None:
    etcd = cluster.etcd()
    bank = cluster.bank("bank-a", etcd=etcd.url)
    e = ["--etcd", etcd.url]
    # The bank registers right after it starts serving: wait (bounded) until it is seen.
    for _ in range(40):
        out = accord("bank", "open-accounts", "bank-a", "x=9", *e, "--json", check=False)
        if out.returncode == 0:
            break
        assert "no live instance" in out.stderr, out.stderr
    assert json.loads(out.stdout) == {"created": 1, "existing": 0}
    assert json.loads(accord("bank", "balances", "bank-a", *e, "--json").stdout) == {"x": 9}
    assert (await balances(bank.address)).total == 9
    unknown = accord("bank", "balances", "bank-zz", *e, check=False)
    assert unknown.returncode == 1 and "no live instance of service 'bank-zz'" in unknown.stderr
