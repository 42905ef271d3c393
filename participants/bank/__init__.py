"""The example bank participant: accounts with balances in SQLite, moved only by 2PC
branches and saga steps through the participant SDK.

2PC operations (payload ``{"account": "bank-0", "amount": 10}``):

- ``debit``: prepare holds the amount (refused with "insufficient funds" when
  ``balance - held < amount``), commit applies it and writes the ledger, abort releases.
- ``credit``: prepare checks that the account exists, commit adds (and writes the
  ledger), abort does nothing.
- ``balance`` (payload ``{"account": ...}``): a read; votes read-only.

Saga operations (Execute / its Compensate, same payload; each writes a ledger entry):

- ``debit`` / ``refund``: takes the amount when ``balance - held >= amount``, else
  refused ("insufficient funds"); ``refund`` gives it back.
- ``credit`` / ``uncredit``: adds the amount; ``uncredit`` takes it back, or answers
  "not yet" ("funds already spent") while ``balance - held < amount``.

The conformance kit's operations (``accord conformance``), in a table of their own
(``conformance``), apart from the money: ``conformance.add`` and ``conformance.get``
(:mod:`accord.participants.bank._conformance`).

Seeded accounts are named ``<service>-<index>`` (:func:`account_id`). The admin API
(``accord.bank.v1.Bank``: OpenAccounts, GetBalances) is served on the same port.

With ``--db postgresql://...`` the bank keeps its accounts in PostgreSQL
(``bank_app_pg`` in ``_logic_pg``): a 2PC branch is a prepared transaction whose row
locks hold the money, so there is no ``held`` column there.

Run it with the :func:`serve_bank` coroutine, or the ``accord participant bank --listen
127.0.0.1:0 --db FILE|URL [--service NAME] [--accounts N --initial-balance X]`` command
(also ``python -m accord.participants.bank ...``); it prints ``listening on HOST:PORT``
once serving.
"""

from accord.participants.bank._admin import BANK_SERVICE_NAME, BankAdmin, install_admin
from accord.participants.bank._logic import SCHEMA, Movement, bank_app, parse
from accord.participants.bank._main import account_id, seed_accounts, serve_bank

__all__ = [
    "BANK_SERVICE_NAME",
    "SCHEMA",
    "BankAdmin",
    "Movement",
    "account_id",
    "bank_app",
    "install_admin",
    "parse",
    "seed_accounts",
    "serve_bank",
]
