"""The README's own commands, run as written against the processes they start, so that
what a new user types works.

The convention (visible in README.md): every ```sh and ```python block is preceded by an
HTML comment that says what the test does with it.

* ``<!-- readme-test: run [expect="TEXT"]... [otlp="SERVICE,..."] -->``: run. The run
  blocks of one README section (heading) are one shell session, in order, like one
  terminal: ``bash -eo pipefail`` (every command must exit 0), ``.venv/bin`` first on
  the PATH, ``TMPDIR`` in the test's directory (so ``cd "$(mktemp -d)"`` lands there,
  and the section must begin with it: nothing is written to the checkout). A line
  ending in ``&`` starts a server: the test sends its output to a log and waits for its
  ready line (``listening on``, ``standby for shard``, etcd's ``ready to serve client
  requests``) before the next line, which is what a user does by eye. Each ``expect``
  must appear in the session's output (runs of spaces count as one, so a table row
  ``x   90   0`` matches ``x 90 0``). With ``otlp``, an OTLP receiver of the test stands
  in for the trace backend on port 4317, and a trace must hold spans of every service
  named.
* ``<!-- readme-test: python-async [expect=...] -->``: a Python block with top-level
  ``await`` (as in ``python -m asyncio``), run in the section's session at that point.
* ``<!-- readme-test: example FILE -->``: the block is FILE verbatim (the examples are run
  by tests/integration/test_examples.py).
* ``<!-- readme-test: skip REASON -->``: not run here, for the reason given (reported as
  a skipped test).

Fixed ports are what a user types but not what a test beside others can use: every
``127.0.0.1:PORT`` of a session is replaced by a free port (the same one throughout the
session), and ``ACCORD_COORDINATOR`` points ``accord txn``'s default, 127.0.0.1:7070, at
the port that replaced 7070. Every process a session starts is stopped by PID at its end, whatever
happened; sessions are bounded in time.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from accord.tools.topology import free_port
from tests.integration._otlp import otlp_receiver

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SESSION_TIMEOUT_S = 120.0  # generous: a loaded 2-core machine runs ~40 CLI starts slowly
READY = r"listening on |standby for shard|ready to serve client requests"

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
_MARKER = re.compile(r"<!-- readme-test: ([\w-]+)(.*?)-->\s*$", re.S)
_OPTION = re.compile(r'(\w+)="([^"]*)"')
_HEADING = re.compile(r"^#{1,4} (.+)$", re.M)
_PORT = re.compile(r"(?<=127\.0\.0\.1:)(\d{4,5})\b")


@dataclass
class Block:
    section: str
    lang: str
    kind: str
    args: str
    text: str
    line: int
    options: list[tuple[str, str]] = field(default_factory=list)

    def values(self, key: str) -> list[str]:
        return [v for k, v in self.options if k == key]


def readme_blocks() -> list[Block]:
    """Every ```sh and ```python block of the README with its marker (kind ``""`` when
    it has none) and the heading it is under."""
    text = README.read_text()
    headings = [(m.start(), m.group(1).strip()) for m in _HEADING.finditer(text)]
    blocks = []
    for m in _FENCE.finditer(text):
        lang = m.group(1)
        if lang not in ("sh", "python"):
            continue
        section = [h for pos, h in headings if pos < m.start()][-1:] or ["(top)"]
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.match(before.strip())
        kind, args = (marker.group(1), marker.group(2).strip()) if marker else ("", "")
        blocks.append(
            Block(
                section=section[0],
                lang=lang,
                kind=kind,
                args=args,
                text=m.group(2),
                line=text.count("\n", 0, m.start()) + 1,
                options=_OPTION.findall(args),
            )
        )
    return blocks


BLOCKS = readme_blocks()
SECTIONS = list(dict.fromkeys(b.section for b in BLOCKS if b.kind in ("run", "python-async")))


def test_every_block_says_how_it_is_tested() -> None:
    unmarked = [
        f"README.md:{b.line} ({b.section})"
        for b in BLOCKS
        if b.kind not in ("run", "python-async", "example", "skip")
        or (b.kind == "skip" and not b.args)
    ]
    assert not unmarked, f"blocks without a readme-test marker (or a skip reason): {unmarked}"


def test_example_blocks_are_the_files_verbatim() -> None:
    for b in (b for b in BLOCKS if b.kind == "example"):
        assert (ROOT / b.args).read_text() == b.text, f"README.md:{b.line} is not {b.args}"


def _servers_in_background(script: str, logs: Path, counter: list[int]) -> str:
    """Each line ending in ``&`` (continuations joined) sends its output to a log and
    waits for the server's ready line; ``$!`` is still the server's PID afterwards."""
    out: list[str] = []
    pending = ""
    for line in script.splitlines():
        pending += line + "\n"
        if line.endswith("\\"):
            continue
        logical, pending = pending.rstrip("\n"), ""
        m = re.match(r"^(.*[^&])&[ \t]*(#.*)?$", logical, re.S)
        if m:
            counter[0] += 1
            log = shlex.quote(str(logs / f"server-{counter[0]}.log"))
            out.append(f"{m.group(1).rstrip()} >{log} 2>&1 & readme_test_started $! {log}")
        else:
            out.append(logical)
    return "\n".join(out) + "\n"


_PRELUDE = f"""
readme_test_started() {{
  echo "$1" >> "$README_TEST_PIDS"
  for _ in $(seq 1 300); do
    if grep -qE '{READY}' "$2"; then return 0; fi
    if ! kill -0 "$1" 2>/dev/null; then echo "readme-test: server $1 exited:"; cat "$2"; return 1; fi
    sleep 0.1
  done
  echo "readme-test: server $1 not ready within 30 s:"; cat "$2"; return 1
}}
"""

_RUN_ASYNC = """
import ast, asyncio, sys
code = compile(open(sys.argv[1]).read(), sys.argv[1], "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
result = eval(code, {"__name__": "__readme__"})
if asyncio.iscoroutine(result):
    asyncio.run(result)
"""


def _venv_bin() -> Path:
    venv = ROOT / ".venv" / "bin"
    return venv if (venv / "accord").exists() else Path(sys.executable).parent


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (exited, not reaped by its new parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _stop(pid: int) -> None:
    """SIGTERM, then SIGKILL after 10 s, for one process the session started."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _gone(pid):
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_section(section: str, tmp_path: Path) -> None:
    blocks = [b for b in BLOCKS if b.section == section and b.kind in ("run", "python-async")]
    first = next(b for b in blocks if b.lang == "sh")
    assert 'cd "$(mktemp -d)"\n' in first.text, (
        f"README.md:{first.line}: a section's commands run in a scratch directory"
    )
    checkout_before = set(os.listdir(ROOT))
    scratch, logs = tmp_path / "scratch", tmp_path / "logs"
    scratch.mkdir()
    logs.mkdir()
    (logs / "run_async.py").write_text(_RUN_ASYNC)
    pids = logs / "pids"
    pids.touch()

    with contextlib.ExitStack() as stack:
        ports: dict[str, str] = {}
        services = [s for b in blocks for v in b.values("otlp") for s in v.split(",")]
        receiver = stack.enter_context(otlp_receiver()) if services else None
        if receiver is not None:
            ports["4317"] = str(receiver.port)

        def local(text: str) -> str:
            return _PORT.sub(lambda m: ports.setdefault(m.group(1), str(free_port())), text)

        script, counter = [_PRELUDE], [0]
        for i, b in enumerate(blocks):
            script.append(f"# README.md:{b.line}\n")
            if b.lang == "sh":
                script.append(_servers_in_background(local(b.text), logs, counter))
            else:
                path = logs / f"block-{i}.py"
                path.write_text(local(b.text))
                script.append(f"python {shlex.quote(str(logs / 'run_async.py'))} {path}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCORD_", "OTEL_"))}
        env |= {
            "PATH": f"{_venv_bin()}{os.pathsep}{env.get('PATH', '')}",
            "TMPDIR": str(scratch),
            "README_TEST_PIDS": str(pids),
            "PYTHONUNBUFFERED": "1",
        }
        if "7070" in ports:  # the default --coordinator of `accord txn`, moved as well
            env["ACCORD_COORDINATOR"] = f"127.0.0.1:{ports['7070']}"
        (logs / "session.sh").write_text("".join(script))
        proc = subprocess.Popen(
            ["bash", "-eo", "pipefail", str(logs / "session.sh")],
            cwd=ROOT,  # where a user starts: the checkout (the section cds away at once)
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=SESSION_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session's own group: a hung command
            output, _ = proc.communicate(timeout=10)
            output += f"\nreadme-test: the session did not end within {SESSION_TIMEOUT_S}s"
        finally:
            for pid in pids.read_text().split():
                _stop(int(pid))

        server_logs = "".join(
            f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("server-*.log"))
        )
        report = f"session:\n{output}\nserver logs:{server_logs}"
        assert proc.returncode == 0, report
        assert set(os.listdir(ROOT)) <= checkout_before, "files left in the checkout"
        flat = " ".join(output.split())
        for b in blocks:
            for want in b.values("expect"):
                assert " ".join(want.split()) in flat, f"README.md:{b.line}: no {want!r}\n{report}"
        if receiver is not None:

            def one_trace(spans: list[Any]) -> bool:
                by_trace: dict[str, set[str]] = {}
                for s in spans:
                    by_trace.setdefault(s.trace_id, set()).add(s.service)
                return any(set(services) <= found for found in by_trace.values())

            receiver.wait_for(one_trace, timeout_s=15, what=f"one trace through {services}")


def test_try_script(tmp_path: Path) -> None:
    """``make try`` (examples/try.sh): the Running-the-pieces sequence by itself, on free
    ports; it stops what it started and leaves no files behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCORD_", "OTEL_"))}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.Popen(
        ["bash", str(ROOT / "examples" / "try.sh")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=SESSION_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # its own group: the script's trap stops the rest
        try:
            stdout, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate(timeout=10)
        stderr += f"\ntry.sh did not end within {SESSION_TIMEOUT_S}s"
    started = re.findall(r"started \S+ \(pid (\d+)\)", stdout)
    for pid in started:  # after a timeout, whatever the trap did not stop
        _stop(int(pid))
    assert proc.returncode == 0, stdout + stderr
    flat = " ".join(stdout.split())
    assert "state: COMMITTED" in flat and "x 90 0" in flat and "y 10 0" in flat, stdout
    assert list(tmp_path.iterdir()) == [], "try.sh removes its scratch directory"
    assert len(started) == 3, stdout
    assert all(_gone(int(pid)) for pid in started), "try.sh stops what it started"
