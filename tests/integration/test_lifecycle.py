"""First contact: every long-running process stops on SIGTERM/SIGINT in every state it
can wait in (a standby waiting for its shard, a wait for etcd, for the WAL directory's
lock, for PostgreSQL, serving), never takes anything over after the signal, gives up a
wrong ``--etcd`` after a bounded wait, and reports a start-up mistake as one ``error:``
line without a traceback. Real processes, real etcd."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from accord.client import Branch, SyncAccordClient
from accord.registry import Etcd, owner_key
from accord.tools.topology import ManagedProcess, accord_argv, free_port
from tests.integration._util import assert_eventually
from tests.integration.conftest import Cluster

pytestmark = pytest.mark.integration

#: A generous bound on "promptly" (the processes take well under a second).
STOP_WITHIN_S = 10.0
#: The shard lease's TTL: short, yet long enough for a busy machine to renew it.
TTL_S = 2


def dead_url() -> str:
    """An etcd URL nothing listens on."""
    return f"http://127.0.0.1:{free_port()}"


async def owner(etcd: str, shard: str) -> dict[str, object]:
    async with Etcd(etcd) as client:
        kv = client.client.kv
        assert kv is not None
        resp = await kv.get(owner_key(shard), timeout=5)
        return json.loads(resp.kvs[0].value) if resp.kvs else {}


async def said(proc: ManagedProcess, text: str, timeout_s: float = 20.0) -> None:
    async def out() -> str:
        return proc.output()

    await assert_eventually(out, lambda o: text in o, timeout_s=timeout_s, what=text)


def spawn(cluster: Cluster, name: str, args: Sequence[str]) -> ManagedProcess:
    """Starts ``accord ARGS``; returns once it has printed its first line (it need not
    serve: these processes are tested while they wait)."""
    proc = cluster.topology.process(name, accord_argv(args), ready="")
    return proc.start(30)


def stop_by(proc: ManagedProcess, sig: signal.Signals) -> int:
    """Sends ``sig``; the exit code (fails if it is still running after STOP_WITHIN_S)."""
    assert proc.proc is not None and proc.alive(), proc.output()
    proc.proc.send_signal(sig)
    try:
        return proc.wait(STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{proc.name} ignored {sig.name}:\n{proc.output()}") from None


# ------------------------------------------------------------------ signals


async def test_a_stopped_standby_exits_and_never_takes_its_shard(cluster: Cluster) -> None:
    etcd = cluster.etcd()
    c1 = cluster.shard_coordinator("c1", "s1", etcd.url, ttl_s=TTL_S)
    c2 = cluster.shard_coordinator("c2", "s1", etcd.url, ttl_s=TTL_S, standby=True)
    c3 = cluster.shard_coordinator("c3", "s1", etcd.url, ttl_s=TTL_S, standby=True)
    assert (await owner(etcd.url, "s1"))["id"] == "c1"

    assert stop_by(c2, signal.SIGTERM) == 0
    c1.kill()  # the shard is free within its TTL: the standby left must take it
    taken = await assert_eventually(
        lambda: owner(etcd.url, "s1"), lambda o: o.get("id") not in (None, "c1"), what="new owner"
    )
    assert taken["id"] == "c3" and taken["epoch"] == 2, taken
    assert "shard_owned" in c3.output() and "shard_owned" not in c2.output()


async def test_a_coordinator_waiting_for_an_unreachable_etcd_stops_on_ctrl_c(
    cluster: Cluster, tmp_path: Path
) -> None:
    wal = str(tmp_path / "wal")
    args = ["coordinator", "--listen", "127.0.0.1:0", "--wal-dir", wal, "--etcd", dead_url()]
    c = spawn(cluster, "c", args)
    await said(c, "event=etcd_waiting")
    assert stop_by(c, signal.SIGINT) == 0
    assert "shard_owned" not in c.output() and "Traceback" not in c.output()


async def test_a_coordinator_waiting_for_the_wal_lock_stops_on_sigterm(cluster: Cluster) -> None:
    """The owner is paused past its lease: the standby takes the shard, then waits for
    the directory's lock the paused process still holds. A SIGTERM then stops it and
    gives the shard back."""
    etcd = cluster.etcd()
    c1 = cluster.shard_coordinator("c1", "s1", etcd.url, ttl_s=TTL_S)
    c2 = cluster.shard_coordinator("c2", "s1", etcd.url, ttl_s=TTL_S, standby=True)
    c1.pause()
    await said(c2, "event=wal_lock_wait")
    assert stop_by(c2, signal.SIGTERM) == 0
    assert "listening on " not in c2.output()
    # Its lease was revoked on the way out: the shard is nobody's until c1 wakes up
    # (and finds itself fenced).
    assert (await owner(etcd.url, "s1")).get("id") != "c2"


@pytest.mark.parametrize(
    "command",
    [
        ["participant", "bank"],
        ["participant", "flight"],
        ["sidecar", "--service", "ext", "--target", "127.0.0.1:9"],
    ],
    ids=["bank", "trip", "sidecar"],
)
async def test_participants_and_the_sidecar_waiting_for_etcd_stop_on_sigterm(
    cluster: Cluster, tmp_path: Path, command: list[str]
) -> None:
    args = [*command, "--etcd", dead_url()]
    if command[0] == "participant":
        args += ["--listen", "127.0.0.1:0", "--db", str(tmp_path / "p.db")]
    p = spawn(cluster, command[-1], args)
    await said(p, "event=etcd_waiting")
    assert stop_by(p, signal.SIGTERM) == 0
    assert "Traceback" not in p.output()


@pytest.fixture
def silent_server() -> Iterator[socket.socket]:
    """A listening TCP socket that never answers (a hung server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        s.settimeout(30)
        yield s


def test_a_bank_waiting_for_postgresql_stops_on_sigterm(silent_server: socket.socket) -> None:
    url = f"postgresql://accord@127.0.0.1:{silent_server.getsockname()[1]}/accord"
    argv = accord_argv(["participant", "bank", "--listen", "127.0.0.1:0", "--db", url])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # It connects (psycopg's connect timeout is 10 s) and waits for an answer.
        conn, _ = silent_server.accept()
        with conn:
            assert proc.poll() is None, proc.communicate()[0]
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=STOP_WITHIN_S)
        assert proc.returncode == 0, out
        assert "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ------------------------------------------------------------------ bounded waits


def test_an_unreachable_etcd_is_given_up_after_the_wait(tmp_path: Path) -> None:
    url = dead_url()
    args = ["coordinator", "--listen", "127.0.0.1:0", "--wal-dir", str(tmp_path / "wal")]
    code, stderr = run_cli([*args, "--etcd", url, "--etcd-wait-s", "2"])
    assert code == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: etcd at {url} unreachable for 2 s: "
    ), stderr
    assert "Traceback" not in stderr
    # At most one warning every few seconds while waiting (not one every 0.5 s).
    assert stderr.count("event=etcd_waiting") <= 2, stderr


async def test_a_dead_trace_backend_does_not_hold_up_the_exit(cluster: Cluster) -> None:
    """Spans are kept queued until the exit (a long batch delay), then the OTLP exporter
    finds nothing at its endpoint: the SDK alone would retry for 30 s."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
    }
    bank = cluster.bank("bank")
    c = cluster.coordinator({"bank": bank.address}, env=env)
    with SyncAccordClient(c.address) as client:
        for _ in range(5):
            branch = Branch(
                service="bank", operation="credit", payload={"account": "a", "amount": 1}
            )
            client.execute([branch])
    t0 = time.monotonic()
    assert stop_by(c, signal.SIGTERM) == 0
    assert "telemetry_flush_abandoned" in c.output(), c.output()
    assert time.monotonic() - t0 < STOP_WITHIN_S


# ------------------------------------------------------------------ one error line


def run_cli(args: Sequence[str]) -> tuple[int, str]:
    return run_clis({"one": args})["one"]


def run_clis(commands: dict[str, Sequence[str]]) -> dict[str, tuple[int, str]]:
    """Runs ``accord`` commands side by side; each one's exit code and stderr."""
    env = {**os.environ, "ACCORD_LOG_LEVEL": "warning"}
    procs = {
        name: subprocess.Popen(
            accord_argv(args),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for name, args in commands.items()
    }
    out: dict[str, tuple[int, str]] = {}
    try:
        for name, proc in procs.items():
            _, stderr = proc.communicate(timeout=60)
            out[name] = (proc.returncode, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return out


def _server(command: str, root: Path) -> list[str]:
    if command == "coordinator":
        return ["coordinator", "--wal-dir", str(root / "wal")]
    return ["participant", "bank", "--db", str(root / f"{command}.db")]


@dataclass(frozen=True)
class StartUpErrors:
    #: Exit code and stderr of each mistake.
    results: dict[str, tuple[int, str]]
    #: The address whose port was in use.
    in_use: str
    root: Path


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory: pytest.TempPathFactory) -> StartUpErrors:
    """Every start-up mistake the tests below look at, each run once, side by side."""
    root = tmp_path_factory.mktemp("start-up")
    (root / "afile").write_text("")
    bad_db = str(root / "afile" / "bank.db")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        in_use = f"127.0.0.1:{busy.getsockname()[1]}"
        results = run_clis(
            {
                "coordinator-port-in-use": [*_server("coordinator", root), "--listen", in_use],
                "bank-port-in-use": [*_server("bank", root), "--listen", in_use],
                "coordinator-malformed": [*_server("coordinator", root), "--listen", "nonsense"],
                "bank-malformed": [*_server("bank", root), "--listen", "nonsense"],
                "sidecar-malformed": ["sidecar", "--service=x", "--target=nonsense", "--etcd=x:1"],
                "off-loopback": [*_server("coordinator", root), "--listen", "192.0.2.1:7070"],
                "db-under-a-file": ["participant", "bank", "--listen=127.0.0.1:0", "--db", bad_db],
            }
        )
    return StartUpErrors(results=results, in_use=in_use, root=root)


def assert_one_error_line(result: tuple[int, str], expected: str) -> None:
    code, stderr = result
    assert code != 0, stderr
    assert stderr.strip().splitlines() == [f"error: {expected}"], stderr


@pytest.mark.parametrize("command", ["coordinator", "bank"])
def test_a_port_in_use_is_one_line(mistakes: StartUpErrors, command: str) -> None:
    assert_one_error_line(
        mistakes.results[f"{command}-port-in-use"],
        f"cannot listen on {mistakes.in_use}: the port is in use",
    )


@pytest.mark.parametrize("command", ["coordinator", "bank", "sidecar"])
def test_a_malformed_address_is_one_line(mistakes: StartUpErrors, command: str) -> None:
    result = mistakes.results[f"{command}-malformed"]
    assert_one_error_line(result, "malformed address 'nonsense': expected HOST:PORT")
    assert result[0] == 2  # bad usage


def test_plain_text_off_loopback_is_one_line(mistakes: StartUpErrors) -> None:
    assert_one_error_line(
        mistakes.results["off-loopback"],
        "refusing to serve plain text on non-loopback address 192.0.2.1:7070: "
        "give --tls-cert and --tls-key (ACCORD_TLS_CERT, ACCORD_TLS_KEY), or --insecure",
    )


def test_a_database_path_that_cannot_be_one_is_one_line(mistakes: StartUpErrors) -> None:
    code, stderr = mistakes.results["db-under-a-file"]
    db = mistakes.root / "afile" / "bank.db"
    assert code == 1 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith(f"error: participant: database {db}: "), stderr


def test_a_wal_directory_in_use_is_one_line_naming_its_holder(
    cluster: Cluster, tmp_path: Path
) -> None:
    first = cluster.coordinator({}, wal="wal")
    result = run_cli([*_server("coordinator", tmp_path), "--listen", "127.0.0.1:0"])
    assert_one_error_line(
        result,
        f"wal: directory {tmp_path / 'wal'} is locked by another WAL (pid {first.pid}); "
        "only one coordinator may own a WAL directory",
    )
