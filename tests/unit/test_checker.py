"""The offline chaos checker on hand-made runs: real bank databases (the bank logic
through the participant SDK, so ledger, branch, barrier and audit rows are the real
ones), histories written with :class:`HistoryWriter`, coordinator lists as
``TxnResult.to_dict()`` gives them. A clean run passes; each invariant is broken once
and caught under its own name."""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from accord.participants import BranchCall, Op, ParticipantService, Status, Store, copy_database
from accord.participants.bank import bank_app
from accord.tools.chaos import (
    ATOMICITY,
    BANK_CONSERVATION,
    BOUNDED_RECOVERY,
    CHECKS,
    CLIENT_AGREEMENT,
    DURABILITY,
    EXACTLY_ONCE,
    HISTORY,
    IDEMPOTENCY_KEY,
    NO_COMPENSATION_AFTER_PIVOT,
    SAGA_COMPLETENESS,
    HistoryWriter,
    Report,
    SagaStepSpec,
    TransferBranch,
    check,
    read_history,
    render_report,
    saga_request,
    transfer_request,
)
from accord.tools.chaos.checker import main as check_main

INITIAL = {"bank-1-0": 100, "bank-1-1": 100, "bank-2-0": 100, "bank-2-1": 100}


class Run:
    """A hand-made chaos run: two bank databases driven through the SDK (as a
    coordinator would), a history and a coordinator's final list."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.services: dict[str, ParticipantService] = {}
        ticks = itertools.count(1)
        self.history_path = root / "history.jsonl"
        self.history = HistoryWriter(
            self.history_path,
            monotonic_ns=lambda: next(ticks) * 1_000_000,
            wall=lambda: 1_764_000_000.0,
        )
        self.coordinator: list[dict[str, Any]] = []
        self.dbs = {name: root / f"{name}.db" for name in ("bank-1", "bank-2")}
        self._process = itertools.count(1)

    async def open(self) -> None:
        for name, path in self.dbs.items():
            seed = [(k, v) for k, v in INITIAL.items() if k.startswith(f"{name}-")]
            svc = ParticipantService(bank_app(name, seed=seed), Store(path))
            await svc.open()
            self.services[name] = svc

    async def close(self) -> None:
        for svc in self.services.values():
            await svc.close()
        self.history.close()

    async def call(
        self,
        service: str,
        op: Op,
        gid: str,
        branch_id: str,
        operation: str,
        account: str,
        amount: int,
        **kw: Any,
    ) -> Status:
        payload = json.dumps({"account": account, "amount": amount}).encode()
        call = BranchCall(gid=gid, branch_id=branch_id, operation=operation, payload=payload, **kw)
        return (await self.services[service].call(op, call)).status

    # -- 2PC ----------------------------------------------------------------------------

    async def transfer(
        self,
        gid: str,
        key: str,
        *,
        amount: int = 10,
        src: tuple[str, str] = ("bank-1", "bank-1-0"),
        dst: tuple[str, str] = ("bank-2", "bank-2-0"),
        told: str | None = None,
        phase_two: Sequence[str] | None = None,
        state: str | None = None,
    ) -> None:
        """A debit at ``src`` and a credit at ``dst``: prepares both, then commits if
        both voted yes, else aborts (or applies ``phase_two`` per branch: "commit",
        "abort" or "" for nothing). The client is told ``told`` (default: by the outcome),
        the coordinator's list says ``state``."""
        branches = [
            TransferBranch(
                service=src[0], branch_id="b1", operation="debit", account=src[1], amount=amount
            ),
            TransferBranch(
                service=dst[0], branch_id="b2", operation="credit", account=dst[1], amount=amount
            ),
        ]
        process = next(self._process)
        self.history.invoke(process, "transfer", key, transfer_request(branches))
        votes = [
            await self.call(b.service, Op.PREPARE, gid, b.branch_id, b.operation, b.account, amount)
            for b in branches
        ]
        yes = all(v is Status.OK for v in votes)
        actions = phase_two if phase_two is not None else ["commit" if yes else "abort"] * 2
        for b, action in zip(branches, actions, strict=True):
            if action:
                op = Op.COMMIT if action == "commit" else Op.ABORT
                await self.call(b.service, op, gid, b.branch_id, b.operation, b.account, amount)
        state = state or ("COMMITTED" if yes and phase_two is None else "ABORTED")
        told = told or ("ok" if state == "COMMITTED" else "fail")
        result = {"state": state, "reason": ""} if told != "info" else None
        error = "UNAVAILABLE: connection reset" if told == "info" else None
        self.history.complete(
            told,
            process,
            "transfer",
            key,
            gid=gid if told != "info" else None,
            result=result,
            error=error,
        )
        self.coordinator.append(
            {
                "gid": gid,
                "state": state,
                "protocol": "TWO_PHASE_COMMIT",
                "idempotency_key": key,
                "reason": "",
                "branches": [
                    {
                        "branch_id": b.branch_id,
                        "service": b.service,
                        "operation": b.operation,
                        "state": "COMMITTED" if state == "COMMITTED" else "ABORTED",
                    }
                    for b in branches
                ],
                "steps": [],
            }
        )

    # -- sagas --------------------------------------------------------------------------

    @staticmethod
    def saga_steps(*, amount: int = 10, pivot: bool = False) -> list[SagaStepSpec]:
        return [
            SagaStepSpec(
                name="debit",
                service="bank-1",
                action="debit",
                compensation="refund",
                account="bank-1-1",
                amount=amount,
                pivot=pivot,
            ),
            SagaStepSpec(
                name="credit",
                service="bank-2",
                action="credit",
                compensation="uncredit",
                account="bank-2-1",
                amount=amount,
                depends_on=("debit",),
            ),
        ]

    async def saga(
        self,
        gid: str,
        key: str,
        steps: Sequence[SagaStepSpec],
        *,
        execute: Sequence[str],
        compensate: Sequence[str] = (),
        told: str,
        state: str,
    ) -> None:
        """Executes the ``execute`` steps, then compensates the ``compensate`` steps,
        in the order given."""
        by_name = {s.name: s for s in steps}
        process = next(self._process)
        self.history.invoke(process, "saga", key, saga_request(steps))
        for name in execute:
            s = by_name[name]
            await self.call(s.service, Op.EXECUTE, gid, s.name, s.action, s.account, s.amount)
        for name in compensate:
            s = by_name[name]
            await self.call(
                s.service, Op.COMPENSATE, gid, s.name, s.compensation, s.account, s.amount
            )
        self.history.complete(
            told, process, "saga", key, gid=gid, result={"state": state, "reason": ""}
        )
        self.coordinator.append(
            {
                "gid": gid,
                "state": state,
                "protocol": "SAGA",
                "idempotency_key": key,
                "reason": "",
                "branches": [],
                "steps": [
                    {"name": s.name, "service": s.service, "action": s.action, "state": ""}
                    for s in steps
                ],
            }
        )

    def sql(self, service: str, statement: str, *params: Any) -> None:
        """Changes a database behind the SDK's back (what a bug or a lost write does)."""
        with closing(sqlite3.connect(self.dbs[service])) as conn:
            conn.execute(statement, params)
            conn.commit()

    async def check(self, **kw: Any) -> Report:
        await self.close()
        return check(
            self.history_path,
            databases=self.dbs,
            initial=INITIAL,
            coordinator_state=self.coordinator,
            **kw,
        )


@pytest.fixture
async def run(tmp_path: Path) -> AsyncIterator[Run]:
    r = Run(tmp_path)
    await r.open()
    yield r
    await r.close()


async def clean_run(run: Run) -> None:
    """A little of everything that is allowed to happen."""
    run.history.fault("kill", "coordinator-1", {"signal": "SIGKILL"})
    await run.transfer("g1", "k1")
    await run.transfer("g2", "k2", src=("bank-2", "bank-2-1"), dst=("bank-1", "bank-1-1"))
    await run.transfer("g3", "k3", amount=1000)  # insufficient funds: refused, aborted
    await run.transfer("g4", "k4", told="info")  # committed, the client never heard
    run.history.fault("restart", "coordinator-1")
    steps = run.saga_steps()
    await run.saga("s1", "k5", steps, execute=["debit", "credit"], told="ok", state="COMPLETED")
    # The credit fails for good: compensated in reverse order (credit's no-op first).
    bad = [steps[0], SagaStepSpec(**{**steps[1].__dict__, "account": "nope"})]
    await run.saga(
        "s2",
        "k6",
        bad,
        execute=["debit", "credit"],
        compensate=["credit", "debit"],
        told="fail",
        state="COMPENSATED",
    )
    run.history.fault("heal", "coordinator-1")
    run.history.quiescent(after_heal_s=2.5)


async def test_clean_run_passes(run: Run) -> None:
    await clean_run(run)
    report = await run.check()
    assert report.valid, [v.message for v in report.violations]
    assert report.stats["outcomes"] == {"ok": 3, "fail": 2, "info": 1}
    assert report.stats["transaction_outcomes"] == {
        "aborted": 1,
        "committed": 3,
        "compensated": 1,
        "completed": 1,
    }
    assert report.stats["faults"] == {"heal": 1, "kill": 1, "restart": 1}
    assert report.to_dict()["violations"] == []
    assert report.to_dict()["checks"] == dict.fromkeys(CHECKS, 0)


async def test_history_round_trip(run: Run) -> None:
    await clean_run(run)
    await run.close()
    events = read_history(run.history_path)
    assert [e.type for e in events][:3] == ["fault", "invoke", "ok"]
    assert events[-1].type == "quiescent"
    assert [e.line for e in events] == list(range(1, len(events) + 1))
    # A torn last line (the harness killed mid-write) is dropped, not an error.
    with run.history_path.open("a") as f:
        f.write('{"type": "invoke", "proc')
    assert len(read_history(run.history_path)) == len(events)


# -- one violation per invariant --------------------------------------------------------


def names(report: Report) -> set[str]:
    return {v.name for v in report.violations}


async def test_atomicity_committed_here_aborted_there(run: Run) -> None:
    await run.transfer("g1", "k1", phase_two=["commit", "abort"], state="COMMITTED", told="info")
    run.history.quiescent(after_heal_s=1.0)
    report = await run.check()
    assert ATOMICITY in names(report)
    example = report.smallest(ATOMICITY)
    assert example is not None and example.gid == "g1"
    assert "committed at ['b1@bank-1'] but aborted at ['b2@bank-2']" in example.message
    # The evidence: the history lines and every audit row of g1.
    assert [h["type"] for h in example.history] == ["invoke", "info"]
    assert {(a["participant"], a["op"], a["outcome"]) for a in example.audit} == {
        ("bank-1", "prepare", "PREPARED"),
        ("bank-1", "commit", "COMMITTED"),
        ("bank-2", "prepare", "PREPARED"),
        ("bank-2", "abort", "ABORTED"),
    }


async def test_atomicity_nothing_left_prepared(run: Run) -> None:
    await run.transfer("g1", "k1", phase_two=["", ""], state="ABORTED", told="fail")
    run.history.quiescent(after_heal_s=1.0)
    report = await run.check()
    assert ATOMICITY in names(report)
    assert "still PREPARED" in str(report.smallest(ATOMICITY))


async def test_client_agreement_ok_but_aborted(run: Run) -> None:
    await run.transfer("g1", "k1", phase_two=["abort", "abort"], state="ABORTED", told="ok")
    run.history.quiescent(after_heal_s=1.0)
    report = await run.check()
    assert names(report) == {CLIENT_AGREEMENT, DURABILITY}
    example = report.smallest(CLIENT_AGREEMENT)
    assert example is not None and "client told ok, the coordinator says ABORTED" in example.message


async def test_client_agreement_fail_but_saga_not_undone(run: Run) -> None:
    steps = run.saga_steps()
    await run.saga(
        "s1",
        "k1",
        steps,
        execute=["debit", "credit"],
        compensate=["credit"],
        told="fail",
        state="COMPENSATED",
    )
    run.history.quiescent(after_heal_s=1.0)
    report = await run.check()
    assert CLIENT_AGREEMENT in names(report)
    assert "['debit'] executed and not compensated" in str(report.smallest(CLIENT_AGREEMENT))


async def test_durability_lost_commit(run: Run, tmp_path: Path) -> None:
    """A participant loses its last commit (the power-loss a missing fsync would cause):
    the database is the copy taken between Prepare and Commit."""
    await run.transfer("g0", "k0")
    before_commit = tmp_path / "before-commit.db"
    run.history.invoke(
        99,
        "transfer",
        "k1",
        transfer_request(
            [
                TransferBranch(
                    service="bank-1",
                    branch_id="b1",
                    operation="debit",
                    account="bank-1-0",
                    amount=5,
                ),
                TransferBranch(
                    service="bank-2",
                    branch_id="b2",
                    operation="credit",
                    account="bank-2-0",
                    amount=5,
                ),
            ]
        ),
    )
    await run.call("bank-1", Op.PREPARE, "g1", "b1", "debit", "bank-1-0", 5)
    await run.call("bank-2", Op.PREPARE, "g1", "b2", "credit", "bank-2-0", 5)
    copy_database(run.dbs["bank-2"], before_commit)
    await run.call("bank-1", Op.COMMIT, "g1", "b1", "debit", "bank-1-0", 5)
    await run.call("bank-2", Op.COMMIT, "g1", "b2", "credit", "bank-2-0", 5)
    run.history.ok(99, "transfer", "k1", gid="g1", result={"state": "COMMITTED"})
    run.history.quiescent(after_heal_s=1.0)
    await run.close()
    run.dbs["bank-2"] = before_commit
    report = await run.check()
    assert DURABILITY in names(report)
    example = report.smallest(DURABILITY)
    assert example is not None and example.gid == "g1"
    assert "the ledger of bank-2 has no entry b2 (+5 on bank-2-0)" in example.message
    assert {ATOMICITY, CLIENT_AGREEMENT, BANK_CONSERVATION} <= names(report)


async def test_saga_half_done(run: Run) -> None:
    steps = run.saga_steps()
    bad = [steps[0], SagaStepSpec(**{**steps[1].__dict__, "account": "nope"})]
    # The credit is refused, and the debit is never compensated.
    await run.saga("s1", "k1", bad, execute=["debit", "credit"], told="info", state="COMPENSATED")
    run.history.quiescent(after_heal_s=1.0)
    report = await run.check()
    assert SAGA_COMPLETENESS in names(report)
    message = str(report.smallest(SAGA_COMPLETENESS))
    assert "half-done: executed ['debit'], compensated [], refused ['credit']" in message


async def test_saga_compensated_in_the_wrong_order(run: Run) -> None:
    steps = run.saga_steps()
    await run.saga(
        "s1",
        "k1",
        steps,
        execute=["debit", "credit"],
        compensate=["debit", "credit"],
        told="fail",
        state="COMPENSATED",
    )
    run.history.quiescent(after_heal_s=1.0)
    report = await run.check()
    assert names(report) == {SAGA_COMPLETENESS}
    assert "step debit compensated before credit, which depends on it" in str(
        report.smallest(SAGA_COMPLETENESS)
    )


async def test_stuck_saga_is_reported_not_a_violation(run: Run) -> None:
    steps = run.saga_steps()
    await run.saga("s1", "k1", steps, execute=["debit", "credit"], told="info", state="STUCK")
    run.history.quiescent(after_heal_s=1.0)
    report = await run.check()
    assert report.valid, [v.message for v in report.violations]
    assert [s["gid"] for s in report.stuck] == ["s1"]


async def test_exactly_once_effect_without_barrier(run: Run) -> None:
    await run.transfer("g1", "k1")
    run.history.quiescent(after_heal_s=1.0)
    await run.close()
    # The credit applied a second time, bypassing the barrier (a broken barrier would).
    run.sql("bank-2", "UPDATE accounts SET balance = balance + 10 WHERE id = 'bank-2-0'")
    run.sql(
        "bank-2",
        "INSERT INTO ledger (gid, branch_id, account, delta, balance_after, created_at)"
        " VALUES ('g1', 'b2-again', 'bank-2-0', 10, 120, 0)",
    )
    report = await run.check()
    assert EXACTLY_ONCE in names(report)
    message = str(report.smallest(EXACTLY_ONCE))
    assert "ledger effect b2-again at bank-2 has no barrier row" in message


async def test_exactly_once_effect_audited_twice(run: Run) -> None:
    await run.transfer("g1", "k1")
    run.history.quiescent(after_heal_s=1.0)
    await run.close()
    run.sql(
        "bank-1",
        "INSERT INTO accord_audit (gid, branch_id, op, outcome, source, at)"
        " VALUES ('g1', 'b1', 'commit', 'COMMITTED', 'resolver', 1)",
    )
    report = await run.check()
    assert names(report) == {EXACTLY_ONCE}
    assert "committed of b1 took effect 2 times at bank-1" in str(report.smallest(EXACTLY_ONCE))


async def test_no_compensation_after_pivot(run: Run) -> None:
    steps = run.saga_steps(pivot=True)
    bad = [steps[0], SagaStepSpec(**{**steps[1].__dict__, "account": "nope"})]
    await run.saga(
        "s1",
        "k1",
        bad,
        execute=["debit", "credit"],
        compensate=["credit", "debit"],
        told="fail",
        state="COMPENSATED",
    )
    run.history.quiescent(after_heal_s=1.0)
    report = await run.check()
    assert names(report) == {NO_COMPENSATION_AFTER_PIVOT}
    assert "pivot ['debit'] compensated" in str(report.smallest(NO_COMPENSATION_AFTER_PIVOT))


async def test_bank_conservation_money_from_nowhere(run: Run) -> None:
    await run.transfer("g1", "k1")
    run.history.quiescent(after_heal_s=1.0)
    await run.close()
    run.sql("bank-1", "UPDATE accounts SET balance = balance + 5 WHERE id = 'bank-1-1'")
    report = await run.check()
    assert names(report) == {BANK_CONSERVATION}
    messages = sorted(v.message for v in report.violations)
    assert any("bank-1-1@bank-1: balance 105 != initial 100 + ledger +0" in m for m in messages)
    assert any(m.startswith("sum of balances 405 != 400") for m in messages)


async def test_bank_conservation_unbalanced_transfer_and_held(run: Run) -> None:
    await run.transfer("g1", "k1")
    run.history.quiescent(after_heal_s=1.0)
    await run.close()
    # The credit's ledger entry says 7, not 10 (and the balance followed it).
    run.sql("bank-2", "UPDATE ledger SET delta = 7, balance_after = 107 WHERE gid = 'g1'")
    run.sql("bank-2", "UPDATE accounts SET balance = 107, held = 3 WHERE id = 'bank-2-0'")
    report = await run.check()
    assert BANK_CONSERVATION in names(report)
    messages = " | ".join(v.message for v in report.violations)
    assert "g1: its ledger entries move -3 in total, expected +0" in messages
    assert "bank-2-0@bank-2: 3 still held at quiescence" in messages


async def test_idempotency_key_reused(run: Run) -> None:
    await run.transfer("g1", "k1")
    await run.transfer("g2", "k1")
    run.history.quiescent(after_heal_s=1.0)
    report = await run.check()
    assert names(report) == {IDEMPOTENCY_KEY}
    assert "'k1' maps to 2 transactions: ['g1', 'g2']" in str(report.smallest(IDEMPOTENCY_KEY))


async def test_bounded_recovery_too_slow(run: Run) -> None:
    await run.transfer("g1", "k1")
    run.history.quiescent(after_heal_s=90.0)
    report = await run.check(recovery_bound_s=60.0)
    assert names(report) == {BOUNDED_RECOVERY}
    assert "90.0s after healing, over the bound of 60.0s" in str(report.smallest(BOUNDED_RECOVERY))


async def test_bounded_recovery_never_quiescent_and_in_doubt(run: Run) -> None:
    await run.transfer("g1", "k1", phase_two=["", ""], state="PREPARING", told="info")
    report = await run.check()
    assert BOUNDED_RECOVERY in names(report)
    messages = " | ".join(v.message for v in report.violations if v.name == BOUNDED_RECOVERY)
    assert "no quiescent event" in messages
    assert "the coordinator still has it PREPARING" in messages
    assert "info operation 'k1' never resolved: still PREPARED" in messages


async def test_history_completion_without_invocation(run: Run) -> None:
    await run.transfer("g1", "k1")
    run.history.ok(7, "transfer", "k-ghost", gid="g1")
    run.history.quiescent(after_heal_s=1.0)
    report = await run.check()
    assert names(report) == {HISTORY}


# -- the command line -------------------------------------------------------------------


async def test_cli_json_and_table(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await clean_run(run)
    await run.close()
    initial = tmp_path / "initial.json"
    initial.write_text(json.dumps(INITIAL))
    coordinator = tmp_path / "coordinator.json"
    coordinator.write_text(json.dumps(run.coordinator))
    args = [
        str(run.history_path),
        *(f"--db={name}={path}" for name, path in run.dbs.items()),
        f"--initial={initial}",
        f"--coordinator-state={coordinator}",
    ]
    assert check_main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["valid"] is True and out["violations"] == []
    assert check_main(args) == 0
    assert "valid: no violations" in capsys.readouterr().out
    # Money from nowhere: exit code 1, the violation in the JSON.
    run.sql("bank-1", "UPDATE accounts SET balance = balance + 1 WHERE id = 'bank-1-0'")
    assert check_main([*args, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["checks"][BANK_CONSERVATION] == 2
    assert out["examples"][BANK_CONSERVATION]["name"] == BANK_CONSERVATION
    assert check_main(args) == 1
    assert "INVALID" in capsys.readouterr().out
    # The module runs as a program.
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "accord.tools.chaos.checker", *args, "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1 and json.loads(proc.stdout)["valid"] is False
    # Unreadable input: exit code 2, one line.
    assert check_main([*args[:1], "--db=bank-1=/nonexistent.db", f"--initial={initial}"]) == 2
    assert capsys.readouterr().err.startswith("error: chaos: participant 'bank-1'")


async def test_render_shows_the_smallest_example(run: Run) -> None:
    from rich.console import Console

    await run.transfer("g1", "k1", phase_two=["commit", "abort"], state="COMMITTED", told="ok")
    run.history.quiescent(after_heal_s=1.0)
    report = await run.check()
    console = Console(record=True, width=200)
    render_report(report, console)
    text = console.export_text()
    assert "atomicity" in text and "FAIL" in text and "smallest example" in text
    assert "INVALID" in text


async def test_writer_classifies_results_and_errors(run: Run) -> None:
    from accord.client import AlreadyExistsError, TxnResult, UnavailableError

    w = run.history
    assert w.result(1, "transfer", "a", TxnResult(gid="g", state="COMMITTING")).type == "ok"
    assert w.result(1, "transfer", "b", TxnResult(gid="g", state="ABORTED")).type == "fail"
    assert w.result(1, "saga", "c", TxnResult(gid="g", state="COMPENSATED")).type == "fail"
    assert w.result(1, "saga", "d", TxnResult(gid="g", state="STUCK")).type == "info"
    assert w.error(1, "saga", "e", UnavailableError("UNAVAILABLE: gone")).type == "info"
    assert w.error(1, "saga", "f", TimeoutError()).error == "TimeoutError"
    assert w.error(1, "saga", "g", AlreadyExistsError("ALREADY_EXISTS: k")).type == "fail"
    with pytest.raises(ValueError, match="unknown fault"):
        w.fault("meteor", "bank-1")


async def test_a_fail_without_gid_is_not_pinned_on_its_key(run: Run) -> None:
    """ALREADY_EXISTS: the key belongs to another (committed) request; this one did
    nothing, which is what its fail says."""
    await run.transfer("g1", "k1")
    request = transfer_request(
        [
            TransferBranch(service="bank-1", operation="debit", account="bank-1-0", amount=1),
            TransferBranch(service="bank-2", operation="credit", account="bank-2-0", amount=1),
        ]
    )
    run.history.invoke(50, "transfer", "k1", request)
    run.history.fail(50, "transfer", "k1", error="ALREADY_EXISTS: key reused")
    run.history.quiescent(after_heal_s=1.0)
    report = await run.check()
    assert report.valid, [v.message for v in report.violations]


async def test_bounded_recovery_settled_too_long_after_the_heal(run: Run) -> None:
    """A branch in doubt at the heal, resolved (by the resolver) long after it."""
    await run.transfer("g1", "k1", phase_two=["commit", ""], state="COMMITTED", told="info")
    run.history.fault("heal", "coordinator-1")  # wall 1_764_000_000.0 (the test's clock)
    await run.transfer("g2", "k2")  # after the heal: the workload, not recovery
    await run.close()
    # The resolver commits the credit, 100 s after the heal.
    run.sql("bank-2", "UPDATE accord_branches SET state = 'COMMITTED' WHERE gid = 'g1'")
    run.sql("bank-2", "UPDATE accounts SET balance = balance + 10 WHERE id = 'bank-2-0'")
    run.sql(
        "bank-2",
        "INSERT INTO ledger (gid, branch_id, account, delta, balance_after, created_at)"
        " VALUES ('g1', 'b2', 'bank-2-0', 10, 120, 0)",
    )
    run.sql(
        "bank-2",
        "INSERT INTO accord_barrier (gid, branch_id, op, status, created_at)"
        " VALUES ('g1', 'b2', 'commit', 'OK', 0)",
    )
    run.sql(
        "bank-2",
        "INSERT INTO accord_audit (gid, branch_id, op, outcome, source, at)"
        " VALUES ('g1', 'b2', 'commit', 'COMMITTED', 'resolver', 1764000100.0)",
    )
    # Align the participants' clocks with the test's: g1 began before the heal, g2 after.
    for db in ("bank-1", "bank-2"):
        run.sql(
            db,
            "UPDATE accord_audit SET at = 1763999990.0 WHERE gid = 'g1' AND source = 'coordinator'",
        )
        run.sql(db, "UPDATE accord_audit SET at = 1764000001.0 WHERE gid = 'g2'")
    run.history = HistoryWriter(run.history_path, wall=lambda: 1_764_000_001.0)
    run.history.quiescent(after_heal_s=1.0)
    report = await run.check(recovery_bound_s=30.0)
    assert names(report) == {BOUNDED_RECOVERY}, [v.message for v in report.violations]
    example = report.smallest(BOUNDED_RECOVERY)
    assert example is not None and example.gid == "g1"
    assert "settled 100.0s after it, over the bound of 30.0s" in example.message
