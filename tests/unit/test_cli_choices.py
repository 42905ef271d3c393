"""The command line's choices are the ones their owners accept (the CLI keeps its own
copy of the coordinator's transports so that starting ``accord`` does not import the
coordinator; the tools' choices come from accord.tools._choices)."""

from __future__ import annotations

from typer.testing import CliRunner

from accord.coordinator import Transport
from accord.tools._choices import Fault, LoadMode
from accord.tools._load import MODES
from accord.tools.chaos import INJECTABLE_FAULTS
from accord.tools.cli import Faults, ParticipantTransport, app


def test_choices_match_their_owners() -> None:
    assert [t.value for t in ParticipantTransport] == [t.value for t in Transport]
    assert tuple(m.value for m in LoadMode) == MODES
    assert tuple(f.value for f in Fault) == INJECTABLE_FAULTS


def test_faults_are_comma_separated() -> None:
    assert Faults.parse("pause, etcd,") == (Fault.PAUSE, Fault.ETCD)
    assert str(Faults.parse("kill-coordinator,power-loss")) == "kill-coordinator,power-loss"


def test_a_bad_choice_is_a_usage_error() -> None:
    for args in (
        ["chaos", "--faults", "pause,meteor"],
        ["load", "--mode", "3pc"],
        ["coordinator", "--participant-transport", "pigeon"],
        ["coordinator", "--log-format", "xml"],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
