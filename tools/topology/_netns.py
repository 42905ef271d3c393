"""Network namespaces as hosts: a lab puts each process of a topology on its own address,
so a test can cut, slow down or lose the packets between two of them.

A :class:`NetLab` is one /24 subnet ``10.213.N.0/24`` (N unused by any other live lab on
this machine) and one namespace ``<prefix>-br`` holding a bridge ``br0``. Each
:meth:`NetLab.host` is a namespace ``<prefix>-<name>`` whose ``eth0`` (a veth) hangs on
that bridge with address ``10.213.N.K``; ``/etc/netns/<ns>/hosts`` maps every host's
name to its address, so names resolve inside ``ip netns exec`` as compose service names
do. With ``root_link`` (the default) this namespace (the test's own) joins the bridge as
``10.213.N.254``, so the test's clients reach every host. Nothing is routed further:
the hosts have no default route, and this machine does not forward.

Faults are undone by :meth:`Fault.heal`: a partition is iptables DROP rules on the
receiving side's INPUT chain (a silent drop, as a real partition: no RST, no ICMP), an
isolation is the host's link to the bridge set down, an impairment (latency, loss) is
:func:`accord.tools.topology._impair.impair`.

Every lab is recorded in ``/run/accord-netlab/<prefix>.json`` with its owner's PID:
:func:`cleanup_stale_labs` (run by every new lab) removes the labs whose owner is gone,
so a test killed mid-run does not break the next one. :meth:`NetLab.close` removes
everything the lab made: it kills what still runs in its namespaces, deletes the
namespaces (their veths go with them), the root link and ``/etc/netns/<ns>``."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol

#: Subnets 10.213.N.0/24, N in 1..250.
_NET = "10.213"
_ROOT_HOST = 254
_REGISTRY = Path("/run/accord-netlab")
_NETNS_ETC = Path("/etc/netns")
_RUN_NETNS = Path("/run/netns")


class NetLabError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetLabError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done


def netns_available() -> str | None:
    """None when ``ip netns`` + veth + bridge + iptables work here (root, iproute2,
    iptables); else the reason, in one line."""
    if os.geteuid() != 0:
        return f"network namespaces need root (this runs as uid {os.geteuid()})"
    if shutil.which("ip") is None:
        return "no `ip` command (Debian's iproute2)"
    if shutil.which("iptables") is None:
        return "no `iptables` command (Debian's iptables: `make iptables`)"
    probe = f"accprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
        _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        _ip("-n", probe, "link", "set", "v0", "master", "br0")
        _run(["ip", "netns", "exec", probe, "iptables", "-w", "-L", "INPUT", "-n"])
    except (NetLabError, OSError, subprocess.TimeoutExpired) as e:
        return f"network namespaces do not work here: {e}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass
class NetHost:
    """One namespace of a lab: processes started with :meth:`argv` run there, on ``ip``."""

    name: str
    ns: str
    ip: str

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run in this host's namespace. ``ip netns exec`` execs it: the PID of
        the process started is the command's own."""
        return ["ip", "netns", "exec", self.ns, *cmd]

    def addr(self, port: int) -> str:
        return f"{self.ip}:{port}"


class _Heals(Protocol):
    def heal(self) -> None: ...


@dataclass
class Fault:
    """A fault a lab injected; :meth:`heal` undoes it (idempotent)."""

    #: "partition", "partition-one-way", "isolate", "impair".
    kind: str
    #: The hosts it concerns (for a partition: from, to).
    hosts: tuple[str, ...]
    _undo: Callable[[], None] = field(repr=False)
    healed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def heal(self) -> None:
        with self._lock:
            if self.healed:
                return
            self.healed = True
        self._undo()


@dataclass
class _Record:
    prefix: str
    subnet: int
    pid: int
    start_time: str
    namespaces: list[str]
    root_link: str | None

    def save(self) -> None:
        _REGISTRY.mkdir(parents=True, exist_ok=True)
        tmp = _REGISTRY / f".{self.prefix}.tmp"
        tmp.write_text(json.dumps(self.__dict__))
        tmp.replace(_REGISTRY / f"{self.prefix}.json")

    @classmethod
    def load(cls, path: Path) -> _Record | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def _start_time(pid: int) -> str:
    """The process's start time (jiffies since boot): a PID reused by another process
    has another one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(record: _Record) -> bool:
    return _start_time(record.pid) == record.start_time != ""


@contextlib.contextmanager
def _registry_lock() -> Iterator[None]:
    _REGISTRY.mkdir(parents=True, exist_ok=True)
    with (_REGISTRY / ".lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _kill_namespace_pids(ns: str) -> None:
    """SIGKILLs, by PID, what still runs in a namespace the lab made."""
    done = _ip("netns", "pids", ns, check=False)
    for word in done.stdout.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(word), signal.SIGKILL)


def _remove(record: _Record) -> None:
    for ns in record.namespaces:
        _kill_namespace_pids(ns)
    for ns in reversed(record.namespaces):
        _ip("netns", "del", ns, check=False)
        shutil.rmtree(_NETNS_ETC / ns, ignore_errors=True)
    if record.root_link:
        _ip("link", "del", record.root_link, check=False)
    with contextlib.suppress(FileNotFoundError):
        (_REGISTRY / f"{record.prefix}.json").unlink()


def cleanup_stale_labs() -> list[str]:
    """Removes the labs whose owner process is gone (a run killed before its teardown);
    returns their prefixes."""
    removed: list[str] = []
    if not _REGISTRY.exists():
        return removed
    with _registry_lock():
        for path in sorted(_REGISTRY.glob("*.json")):
            record = _Record.load(path)
            if record is None:
                path.unlink(missing_ok=True)
                continue
            if not _alive(record):
                _remove(record)
                removed.append(record.prefix)
    return removed


class NetLab:
    """A bridge and the hosts hanging on it; see the module's docstring. A context
    manager (``with`` and ``async with``); :meth:`close` is safe twice."""

    def __init__(self, prefix: str | None = None, *, root_link: bool = True) -> None:
        cleanup_stale_labs()
        self.prefix = prefix or f"acc{secrets.token_hex(3)}"
        if len(self.prefix) > 12:
            # The root link is named "<prefix>r" (interface names: 15 characters).
            raise ValueError(f"lab prefix {self.prefix!r}: at most 12 characters")
        self.hosts: dict[str, NetHost] = {}
        self.faults: list[Fault] = []
        self._veths: dict[str, str] = {}
        self._closed = False
        self._lock = threading.RLock()
        self.bridge_ns = f"{self.prefix}-br"
        with _registry_lock():
            taken = {
                r.subnet
                for p in _REGISTRY.glob("*.json")
                if (r := _Record.load(p)) is not None and r.prefix != self.prefix
            }
            if (_REGISTRY / f"{self.prefix}.json").exists() or (
                _RUN_NETNS / self.bridge_ns
            ).exists():
                raise NetLabError(f"a lab with prefix {self.prefix!r} exists already")
            free = [n for n in range(1, 251) if n not in taken]
            if not free:
                raise NetLabError("no free 10.213.N.0/24 subnet: 250 live labs")
            self.subnet = free[0]
            self._record = _Record(
                prefix=self.prefix,
                subnet=self.subnet,
                pid=os.getpid(),
                start_time=_start_time(os.getpid()),
                namespaces=[],
                root_link=None,
            )
            self._record.save()
        try:
            self._add_namespace(self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            self.root_ip: str | None = None
            if root_link:
                self._link_root()
        except BaseException:
            self.close()
            raise

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{_NET}.{self.subnet}.0/24")

    def _add_namespace(self, ns: str) -> None:
        self._record.namespaces.append(ns)
        self._record.save()  # recorded first: a crash right after leaves nothing unknown
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _link_root(self) -> None:
        name = f"{self.prefix}r"
        self._record.root_link = name
        self._record.save()
        _ip("link", "add", name, "type", "veth", "peer", "name", "vroot", "netns", self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "set", "vroot", "master", "br0", "up")
        self.root_ip = f"{_NET}.{self.subnet}.{_ROOT_HOST}"
        _ip("addr", "add", f"{self.root_ip}/24", "dev", name)
        _ip("link", "set", name, "up")

    # ------------------------------------------------------------ hosts

    def host(self, name: str) -> NetHost:
        """The host ``name`` (made on first use): namespace ``<prefix>-<name>``, ``eth0``
        on the bridge, the next address of the subnet."""
        with self._lock:
            if self._closed:
                raise NetLabError("the lab is closed")
            if name in self.hosts:
                return self.hosts[name]
            if not name or len(name) > 40 or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"host name {name!r}: letters, digits, - and _ only")
            index = len(self.hosts) + 1
            if index >= _ROOT_HOST:
                raise NetLabError("a lab holds at most 253 hosts")
            ns = f"{self.prefix}-{name}"
            veth = f"v{index}"
            ip = f"{_NET}.{self.subnet}.{index}"
            self._add_namespace(ns)
            _ip(
                *("-n", self.bridge_ns, "link", "add", veth, "type", "veth"),
                *("peer", "name", "eth0", "netns", ns),
            )
            _ip("-n", self.bridge_ns, "link", "set", veth, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            host = NetHost(name=name, ns=ns, ip=ip)
            self.hosts[name] = host
            self._veths[name] = veth
            self._write_hosts_files()
            return host

    def _write_hosts_files(self) -> None:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        lines += [f"{h.ip}\t{h.name}" for h in self.hosts.values()]
        text = "\n".join(lines) + "\n"
        for h in self.hosts.values():
            d = _NETNS_ETC / h.ns
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts").write_text(text)

    def _ip_of(self, name: str) -> str:
        if name in self.hosts:
            return self.hosts[name].ip
        if name == "root" and self.root_ip is not None:
            return self.root_ip
        raise KeyError(f"no host {name!r} in lab {self.prefix}")

    # ------------------------------------------------------------ faults

    def _iptables(self, ns: str, op: str, rule: Sequence[str]) -> None:
        _run(["ip", "netns", "exec", ns, "iptables", "-w", op, *rule])

    def partition(self, a: str, b: str, *, one_way: bool = False) -> Fault:
        """Drops the packets from ``a`` to ``b`` (and from ``b`` to ``a`` unless
        ``one_way``): DROP rules on the receiver's INPUT chain. ``"root"`` is this
        namespace (the test's clients), as a sender only."""
        tag = f"accord-fault-{secrets.token_hex(4)}"
        rules: list[tuple[str, list[str]]] = []
        pairs = [(a, b)] if one_way else [(a, b), (b, a)]
        for src, dst in pairs:
            if dst not in self.hosts:
                raise KeyError(f"no host {dst!r} in lab {self.prefix}")
            rule = ["INPUT", "-s", self._ip_of(src), "-m", "comment", "--comment", tag]
            rules.append((self.hosts[dst].ns, [*rule, "-j", "DROP"]))
        done: list[tuple[str, list[str]]] = []

        def undo() -> None:
            for ns, rule in done:
                self._iptables(ns, "-D", rule)

        with self._lock:
            for ns, rule in rules:
                self._iptables(ns, "-I", rule)
                done.append((ns, rule))
            fault = Fault("partition-one-way" if one_way else "partition", (a, b), undo)
            self.faults.append(fault)
        return fault

    def isolate(self, name: str) -> Fault:
        """Cuts the host off from every other: its link to the bridge goes down (its own
        ``eth0`` stays up, so it sees no error: its packets vanish)."""
        veth = self._veths[name]

        def undo() -> None:
            _ip("-n", self.bridge_ns, "link", "set", veth, "up")

        with self._lock:
            _ip("-n", self.bridge_ns, "link", "set", veth, "down")
            fault = Fault("isolate", (name,), undo)
            self.faults.append(fault)
        return fault

    def impair(
        self,
        name: str,
        *,
        delay_ms: float = 0,
        jitter_ms: float = 0,
        loss_pct: float = 0,
        peer: str | None = None,
        seed: int | None = None,
    ) -> Fault:
        """Latency and loss on the host's egress (towards ``peer`` only if given); see
        :mod:`accord.tools.topology._impair` (``seed`` draws the jitter; the kernel
        draws the losses)."""
        from accord.tools.topology import _impair

        host = self.hosts[name]
        peer_ip = self._ip_of(peer) if peer is not None else None
        with self._lock:
            impairment: _Heals = _impair.impair(
                host.ns,
                "eth0",
                delay_ms=delay_ms,
                jitter_ms=jitter_ms,
                loss_pct=loss_pct,
                peer_ip=peer_ip,
                seed=seed,
            )
            fault = Fault("impair", (name, *((peer,) if peer else ())), impairment.heal)
            self.faults.append(fault)
        return fault

    def heal_all(self) -> None:
        """Heals every fault not yet healed (each one tried, the first error raised)."""
        first: BaseException | None = None
        for fault in reversed(self.faults):
            try:
                fault.heal()
            except Exception as e:  # heal the others first
                first = first or e
        if first is not None:
            raise first

    # ------------------------------------------------------------ life cycle

    def close(self) -> None:
        """Heals the faults, kills what still runs in the lab's namespaces (by PID),
        deletes the namespaces, veths, ``/etc/netns/<ns>`` and the lab's record."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(Exception):
            self.heal_all()
        with _registry_lock():
            _remove(self._record)

    def __enter__(self) -> NetLab:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> NetLab:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NetLab({self.prefix!r}, {self.network}, hosts={list(self.hosts)})"
