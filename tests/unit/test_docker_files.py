"""docker/compose.yaml and .dockerignore, checked without a Docker engine: the compose
file is YAML without duplicate keys (a repeated key silently replaces the first), and
every ``accord`` command line in it is one the real CLI accepts (each is run with
``--help`` appended: the CLI parses every option before it prints help, so an unknown
subcommand or flag fails with exit 2)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a mapping with the same key twice."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys may override
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first on line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _unique_mapping,
)


def load_compose(text: str) -> dict[str, Any]:
    data = yaml.load(text, Loader=_UniqueKeyLoader)
    assert isinstance(data, dict)
    return data


def test_the_loader_refuses_a_duplicate_key() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'depends_on'"):
        load_compose("a:\n  depends_on: [x]\n  image: y\n  depends_on: [z]\n")


def test_compose_has_no_duplicate_keys() -> None:
    services = load_compose(COMPOSE.read_text())["services"]
    assert {"etcd", "bank-a", "bank-b", "coordinator", "accounts"} <= set(services)


def accord_command_lines() -> list[tuple[str, list[str]]]:
    """(service, argv after ``accord``) for every accord command the compose file runs:
    the command of a service built from docker/Dockerfile (whose entrypoint is
    ``accord``), and each ``accord ...`` in a ``sh -c`` script."""
    out = []
    for name, svc in load_compose(COMPOSE.read_text())["services"].items():
        if "build" not in svc or "command" not in svc:
            continue
        command = [str(c) for c in svc["command"]]
        if svc.get("entrypoint") == [] and command[:2] == ["sh", "-c"]:
            for part in command[2].split("&&"):
                argv = shlex.split(part)
                if argv and argv[0] == "accord":
                    out.append((name, argv[1:]))
        else:
            out.append((name, command))
    return out


def test_compose_runs_accord_commands() -> None:
    names = {name for name, _ in accord_command_lines()}
    assert {"bank-a", "bank-b", "bank-b-sidecar", "coordinator", "accounts"} <= names


def _lines_or_none() -> list[tuple[str, list[str]]]:
    """At collection: a broken compose file fails test_compose_has_no_duplicate_keys."""
    try:
        return accord_command_lines()
    except yaml.YAMLError:
        return []


@pytest.mark.parametrize(
    "service,argv", _lines_or_none(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_accord_command_and_flag_exists(service: str, argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "accord.tools.cli", *argv, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"{service}: accord {shlex.join(argv)}\n{proc.stderr}"


def test_dockerignore_keeps_the_build_context_small() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "chaos-out", "**/__pycache__", ".mypy_cache"} <= ignored
