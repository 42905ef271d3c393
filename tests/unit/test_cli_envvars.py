"""Every option of every ``accord`` command can be set from an ``ACCORD_*`` environment
variable (the README promises it), except the few listed below on purpose."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import typer

from accord.tools.cli import app

#: Options without an environment variable, and why. The README lists them.
NO_ENVVAR = {
    # An output format chosen per invocation: an exported ACCORD_JSON would change what
    # every script reading another command's output gets. (`accord load --json FILE`,
    # a report destination, has one: ACCORD_LOAD_JSON.)
    "--json": "output format",
    # A key names one transaction for good: an exported key would make every later
    # `txn execute`/`txn saga`/`txn begin` return the first transaction again.
    "--idempotency-key": "names one transaction",
    # Each belongs to one request: a page of one listing, a branch of one transaction,
    # the reason of one abort or cancel.
    "--page-token": "one listing",
    "--branch-id": "one branch",
    "--reason": "one request",
}


def _options(command: Any, path: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    for param in command.params:
        if param.param_type_name == "option":
            yield " ".join(path), param
    for name, sub in getattr(command, "commands", {}).items():
        yield from _options(sub, (*path, name))


def test_every_option_has_an_accord_envvar() -> None:
    root = typer.main.get_command(app)
    options = list(_options(root, ("accord",)))
    assert len(options) > 100, "the walk must reach every command, groups included"
    missing = [
        f"{where} {param.opts[0]}"
        for where, param in options
        if not param.envvar and param.opts[0] not in NO_ENVVAR
    ]
    assert missing == [], "options without an ACCORD_* envvar (or a reason in NO_ENVVAR)"
    for where, param in options:
        names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
        assert all(n.startswith("ACCORD_") for n in names), (where, param.opts, names)


def test_the_allow_list_is_used_and_json_switches_are_flags() -> None:
    root = typer.main.get_command(app)
    without = {p.opts[0] for _, p in _options(root, ("accord",)) if not p.envvar}
    assert without == set(NO_ENVVAR), "keep NO_ENVVAR (and the README) exact"
    for _, param in _options(root, ("accord",)):
        if param.opts[0] == "--json" and not param.envvar:
            assert param.is_flag


def test_one_command_never_reads_one_variable_for_two_options() -> None:
    def commands(command: Any, path: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
        yield " ".join(path), command
        for name, sub in getattr(command, "commands", {}).items():
            yield from commands(sub, (*path, name))

    for where, command in commands(typer.main.get_command(app), ("accord",)):
        envvars = [p.envvar for p in command.params if getattr(p, "envvar", None)]
        assert len(envvars) == len(set(envvars)), (where, envvars)
