"""``python -m accord.tools.chaos.checker HISTORY --db NAME=PATH ... --initial FILE
--coordinator-state FILE [--coordinator-state FILE ...] [--recovery-bound-s S] [--json]``

Checks a saved chaos run offline. Exit code 0: no violations; 1: violations found;
2: the input could not be read (a one-line reason on stderr).

(Named ``checker``, not ``check``: importing a submodule ``accord.tools.chaos.check`` would
replace the package's :func:`accord.tools.chaos.check` function with the module.)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from accord.common.exits import ExitCode
from accord.tools.chaos._checker import DEFAULT_RECOVERY_BOUND_S, check
from accord.tools.chaos._final import StateError, load_coordinator_state, load_initial
from accord.tools.chaos._history import HistoryError
from accord.tools.chaos._render import render_report


def _db(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m accord.tools.chaos.checker",
        description="Check a chaos history against the participants' final databases.",
    )
    p.add_argument("history", type=Path, help="the JSONL history file")
    p.add_argument(
        "--db",
        type=_db,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a participant service and its SQLite file (repeat per participant)",
    )
    p.add_argument(
        "--initial", type=Path, required=True, help="JSON object: account -> initial balance"
    )
    p.add_argument(
        "--coordinator-state",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="JSON list of the coordinator's final transactions (repeat per coordinator)",
    )
    p.add_argument(
        "--recovery-bound-s",
        type=float,
        default=DEFAULT_RECOVERY_BOUND_S,
        help=f"longest allowed time from the last heal to quiescence (default"
        f" {DEFAULT_RECOVERY_BOUND_S:g})",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        coordinator: list[list[dict[str, Any]]] = [
            load_coordinator_state(f) for f in args.coordinator_state
        ]
        report = check(
            args.history,
            databases=dict(args.db),
            initial=load_initial(args.initial),
            coordinator_state=coordinator,
            recovery_bound_s=args.recovery_bound_s,
        )
    except (HistoryError, StateError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return ExitCode.USAGE
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render_report(report, Console())
    return ExitCode.OK if report.valid else ExitCode.FAILURE


if __name__ == "__main__":
    sys.exit(main())
