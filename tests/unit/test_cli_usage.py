"""What a new user meets at the command line, without a server: usage errors in one line
with exit code 2, saga files refused with the problem named, the transaction list never
cutting an id, the chaos faults all listed, and the outcome checks of txn saga/cancel/
retry and their idempotency-key note (with the client call faked)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from accord.client import StepResult, TxnResult, TxnState
from accord.tools import cli
from accord.tools._choices import FAULT_HELP, Fault, TxnStateChoice

GID = "accord-1:0190c1a2b3c4deadbeef00000001"


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        cli.main(list(argv))
    out, err = capsys.readouterr()
    code = exited.value.code
    assert isinstance(code, int)
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["txn", "list", "--state", "BOGUS"], "'BOGUS' is not one of"),
        (["load", "--mode", "3pc"], "'3pc' is not one of"),
        (["chaos", "--faults", "pause,meteor"], "meteor"),
        (["txn", "get"], "Missing argument"),
        (["txn", "nope"], "No such command"),
        (["bank", "open-accounts", "127.0.0.1:1", "alice"], "expected NAME=AMOUNT"),
        (["bank", "open-accounts", "127.0.0.1:1", "alice=-1"], ">= 0"),
        (["bank", "open-accounts", "127.0.0.1:1", "alice=1e3"], "whole number"),
        (["txn", "execute", "no-slash"], "expected SERVICE/OPERATION"),
    ],
)
def test_usage_errors_are_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    code, out, err = run_main(capsys, *argv)
    assert code == 2, err
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and says in err, err
    assert err.startswith("error: ")


def test_help_still_exits_0_and_a_bare_group_shows_its_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_main(capsys, "txn", "list", "--help")
    assert code == 0 and "--state" in out
    code, out, err = run_main(capsys, "bank")
    assert code == 2 and "open-accounts" in out and err == ""


def test_states_are_the_clients_and_any_case_is_accepted() -> None:
    assert [s.value for s in TxnStateChoice] == [
        s.value for s in TxnState if s is not TxnState.UNSPECIFIED
    ]
    result = CliRunner().invoke(cli.app, ["txn", "list", "--state", "stuck", "--help"])
    assert result.exit_code == 0


def test_chaos_help_lists_every_fault() -> None:
    assert set(FAULT_HELP) == set(Fault)
    result = CliRunner().invoke(cli.app, ["chaos", "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    for fault in Fault:
        assert f"{fault} (" in text, fault


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("[]", "the top level is a JSON list; expected an object"),
        ('[{"name": "a"}]', "the top level is a JSON list"),
        ("{steps: []}", "not JSON"),
        ("", "not JSON"),
        ("{}", '"steps" must be a non-empty list'),
        ('{"steps": {}}', '"steps" must be a non-empty list'),
        ('{"steps": ["a"]}', "step 1 is a JSON str"),
        ('{"steps": [{"name": "a", "service": "s"}]}', "step 1 (a) lacks action"),
        (
            '{"steps": [{"name": "a", "service": "s", "action": "x"}, {"action": "y"}]}',
            'step 2 (unnamed) lacks name, "service" or "address"',
        ),
        ('{"steps": [{"name": "a", "service": "s", "action": "x", "pivot": "maybe"}]}', "step 1"),
        ('{"timeout_ms": "soon", "steps": [{"name": "a"}]}', '"timeout_ms" must be'),
    ],
)
def test_a_bad_saga_file_is_named_in_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, says: str
) -> None:
    f = tmp_path / "saga.json"
    f.write_text(content)
    code, out, err = run_main(capsys, "txn", "saga", "--file", str(f), "-c", "127.0.0.1:9")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert f"saga file {f}: " in err and says in err, err


def test_a_missing_saga_file_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, "txn", "saga", "--file", str(tmp_path / "no.json"))
    assert code == 2 and "No such file" in err


def _txn(state: str, *, gid: str = GID, reason: str = "", key: str = "", saga: bool = True) -> Any:
    steps = (
        (
            StepResult(
                name="flight",
                service="flight",
                address="127.0.0.1:7301",
                action="book",
                state="SUCCEEDED",
                attempts=1,
                compensation_attempts=0,
                last_error="",
                result=b"",
            ),
        )
        if saga
        else ()
    )
    return TxnResult(
        gid=gid,
        state=state,
        reason=reason,
        idempotency_key=key,
        steps=steps,
        protocol="SAGA" if saga else "TWO_PHASE_COMMIT",
    )


def fake_call(monkeypatch: pytest.MonkeyPatch, result: Any) -> None:
    monkeypatch.setattr(cli, "_client_call", lambda address, etcd, fn, token="": result)


def saga_file(tmp_path: Path) -> str:
    f = tmp_path / "saga.json"
    f.write_text(json.dumps({"steps": [{"name": "a", "service": "s", "action": "x"}]}))
    return str(f)


def test_no_wait_prints_only_the_gid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_call(monkeypatch, _txn("RUNNING"))
    code, out, err = run_main(capsys, "txn", "saga", "--file", saga_file(tmp_path), "--no-wait")
    assert (code, out, err) == (0, GID + "\n", "")


@pytest.mark.parametrize(
    ("command", "state", "code"),
    [
        ("cancel", "COMPENSATED", 0),
        ("cancel", "STUCK", 1),
        ("cancel", "COMPLETED", 1),
        ("retry", "COMPENSATED", 0),
        ("retry", "STUCK", 1),
    ],
)
def test_cancel_and_retry_succeed_only_when_compensated(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    state: str,
    code: int,
) -> None:
    fake_call(monkeypatch, _txn(state, reason="compensation of step flight failed"))
    got, out, err = run_main(capsys, "txn", command, GID)
    assert got == code and GID in out
    if code:
        assert len(err.strip().splitlines()) == 1
        assert f"saga {GID} " in err and f"but {state}, not COMPENSATED" in err
        assert ("accord txn retry" in err) == (state == "STUCK")
    else:
        assert err == ""


@pytest.mark.parametrize(
    ("argv", "result", "noted"),
    [
        (["execute", "bank/debit"], _txn("ABORTED", saga=False), True),
        (["execute", "bank/debit"], _txn("COMMITTED", saga=False), False),
        (["saga"], _txn("COMPENSATED"), True),
        (["saga"], _txn("STUCK"), True),
        (["saga"], _txn("COMPLETED"), False),
    ],
)
def test_an_aborted_result_notes_that_its_key_is_spent(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    result: Any,
    noted: bool,
) -> None:
    fake_call(monkeypatch, result)
    file = ["--file", saga_file(tmp_path)] if argv == ["saga"] else []
    _, _, err = run_main(capsys, "txn", *argv, *file, "--idempotency-key", "k-1")
    note = "note: idempotency key k-1 now names this aborted transaction; a new attempt needs a new key"
    assert (note in err) == noted, err
    if noted:
        assert err.strip() == note
    # Without a key, no note.
    _, _, err = run_main(capsys, "txn", *argv, *file)
    assert "note:" not in err


def test_commit_notes_the_key_the_transaction_was_begun_with(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_call(monkeypatch, _txn("ABORTED", key="order-7", saga=False))
    code, _, err = run_main(capsys, "txn", "commit", GID)
    assert code == 1 and "note: idempotency key order-7 now names" in err


def _listing(width: int, terminal: bool) -> str:
    buf = io.StringIO()
    out = Console(file=buf, width=width, force_terminal=terminal, color_system=None)
    txns = [
        _txn("COMPENSATED", reason="step car failed: no car available in Paris " * 2),
        _txn("COMMITTED", gid="accord-2:0190c1a2b3c4deadbeef00000002", saga=False),
    ]
    cli.render_txn_list(txns, out)
    return buf.getvalue()


@pytest.mark.parametrize(("width", "terminal"), [(80, True), (60, True), (40, True), (80, False)])
def test_the_transaction_list_never_cuts_an_id(width: int, terminal: bool) -> None:
    text = _listing(width, terminal)
    assert GID in text and "accord-2:0190c1a2b3c4deadbeef00000002" in text
    assert "…" not in text


def test_off_a_terminal_the_list_is_one_transaction_a_line() -> None:
    lines = _listing(80, terminal=False).splitlines()
    assert lines[0].split() == ["GID", "STATE", "BRANCHES", "REASON"]
    assert lines[1].split()[:3] == [GID, "COMPENSATED", "1"]
    assert lines[1].endswith("no car available in Paris")
    assert lines[2].split() == ["accord-2:0190c1a2b3c4deadbeef00000002", "COMMITTED", "0"]
    assert len(lines) == 3


def test_a_wide_terminal_gets_a_table() -> None:
    text = _listing(120, terminal=True)
    assert "┃ gid" in text and GID in text
