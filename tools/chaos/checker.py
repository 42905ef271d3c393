"""``python -m accord.tools.chaos.checker HISTORY --db NAME=PATH ... --initial FILE
--coordinator-state FILE [--coordinator-state FILE ...] [--recovery-bound-s S] [--json]``:
the ``accord chaos check`` command (:func:`accord.tools.cli.chaos_check`) as a program.

Checks a saved chaos run offline. Exit code 0: no violations; 1: violations found;
2: the input could not be read (a one-line reason on stderr).

(Named ``checker``, not ``check``: importing a submodule ``accord.tools.chaos.check`` would
replace the package's :func:`accord.tools.chaos.check` function with the module.)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the check on ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    from accord.tools.cli import chaos_check, run_standalone

    return run_standalone(chaos_check, "python -m accord.tools.chaos.checker", argv)


if __name__ == "__main__":
    sys.exit(main())
