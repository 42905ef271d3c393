"""The etcd registry: leased registrations kept alive in the background, and watched
prefix caches that answer look-ups locally (DESIGN.md, etcd key layout).

Client library: ``etcd3aio`` (grpc.aio, the same gRPC and protobuf as the rest of
Accord). Only one etcd client library may be imported per process (their generated
protos collide), so every etcd call in Accord goes through this module.

How the pieces behave when etcd misbehaves:

- At start-up, :meth:`Etcd.wait_reachable` waits for etcd's first answer for at most
  ``wait_s`` seconds (``--etcd-wait-s``, default :data:`DEFAULT_ETCD_WAIT_S`), warning at
  most every :data:`WARN_EVERY_S`, then gives up with one line
  (:class:`EtcdUnreachableError`): a wrong ``--etcd`` is reported, not retried for ever.
  Once etcd has answered, an outage is ridden out as below.

- :class:`Registration` grants a lease, puts its key on it, and renews the lease every
  TTL/3. If a renewal says the lease is gone (etcd lost it, an operator revoked it, the
  process was paused past its TTL) it grants a new one and puts the key again; while
  etcd is unreachable it keeps trying every second. A put that fails gives up its lease
  (nothing renews it meanwhile, so it may be gone by the next try): the next try takes a
  new one. After any failed round, and once a TTL anyway, it reads the key back and puts
  it again if it is not on the lease (a live lease alone does not prove the key is
  there). ``close()`` revokes the lease, so a clean shutdown removes the key at once.
- :class:`PrefixCache` reads a prefix once, then follows a watch from the next
  revision. A resync (one ``Range``) every ``resync_s`` seconds is the safety net the
  watch cannot be: it notices that etcd is unreachable (the watch retries silently),
  and it repairs the cache after etcd lost its data (revisions going backwards, where a
  resumed watch would wait for a revision that never comes). While etcd is unreachable
  the cache keeps its last contents: a registry outage must not make the coordinator
  forget the participants it is talking to.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from etcd3aio import Etcd3Client, EtcdError, prefix_range_end

from accord.common.exits import StartupError
from accord.common.transport import TransportSettings
from accord.registry._base import Instance

log = logging.getLogger("accord.registry")
# etcd3aio warns at every watch reconnect attempt; this module logs an outage once.
logging.getLogger("etcd3aio").setLevel(logging.ERROR)

ROOT = "/accord/v1/"
SERVICES = ROOT + "services/"
COORDINATORS = ROOT + "coordinators/"

#: Default lease TTL of a registration (seconds).
DEFAULT_TTL_S = 5
#: Deadline of one etcd request made by the registry.
REQUEST_TIMEOUT_S = 2.0

#: How long a process waits at start-up for etcd's first answer before giving up.
DEFAULT_ETCD_WAIT_S = 30.0
#: While waiting for etcd (or for a shard), at most one warning this often.
WARN_EVERY_S = 5.0

_ERRORS = (EtcdError, grpc.aio.AioRpcError, TimeoutError, OSError)

#: Answers that mean "this is not (our) etcd": waiting longer will not help.
_NOT_ETCD = (
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
)


class EtcdUnreachableError(StartupError, ConnectionError):
    """etcd did not answer at start-up within the wait allowed (or answered, but not as
    an etcd Accord can use)."""


class Throttle:
    """``if throttle.ready(): log...``: true at most once every ``every_s`` seconds."""

    def __init__(self, every_s: float = WARN_EVERY_S) -> None:
        self.every_s = every_s
        self._last: float | None = None
        #: Calls refused since the last one allowed (to say "N more" in the next line).
        self.skipped = 0

    def ready(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self._last is not None and now - self._last < self.every_s:
            self.skipped += 1
            return False
        self._last = now
        return True

    def take_skipped(self) -> int:
        n, self.skipped = self.skipped, 0
        return n


def parse_endpoints(url: str) -> list[str]:
    """``http://127.0.0.1:2379[,http://host:port...]`` (or bare ``host:port``, or
    ``https://`` URLs for TLS: every endpoint the same scheme) → the ``host:port`` list
    etcd3aio wants."""
    return _parse(url)[0]


def channel_target(endpoints: Sequence[str]) -> str:
    """The gRPC target for ``host:port`` endpoints. etcd3aio dials ``ipv4:A,B,...``,
    which takes only IPv4 literals; a single endpoint named by host (compose's
    ``etcd:2379``, a Kubernetes Service) is dialled as ``dns:///host:port`` instead,
    so gRPC resolves it, and resolves it again when it reconnects. Several endpoints
    with host names are resolved here, once (gRPC has no multi-name target): give a
    cluster as one name (a DNS name with every member's address, or a load-balanced
    Service) to follow members whose addresses change."""
    hosts = [e.rsplit(":", 1) for e in endpoints]
    if all(_is_ipv4(h) or h == "localhost" for h, _ in hosts):
        return "ipv4:" + ",".join(e.replace("localhost", "127.0.0.1") for e in endpoints)
    if len(hosts) == 1:
        return f"dns:///{endpoints[0]}"
    resolved: list[str] = []
    for host, port in hosts:
        if _is_ipv4(host):
            resolved.append(f"{host}:{port}")
            continue
        try:
            infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            raise StartupError(
                f"etcd endpoint {host}:{port}: cannot resolve {host!r}: {e}"
            ) from None
        for info in infos:
            addr = f"{info[4][0]}:{port}"
            if addr not in resolved:
                resolved.append(addr)
    return "ipv4:" + ",".join(resolved)


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _parse(url: str) -> tuple[list[str], bool]:
    """The endpoints and whether they are ``https://``."""
    endpoints = []
    schemes = set()
    for part in url.split(","):
        part = part.strip()
        if not part:
            continue
        if "://" not in part:
            part = "http://" + part
        u = urlsplit(part)
        if u.scheme not in ("http", "https"):
            raise ValueError(
                f"etcd endpoint {part!r}: only http:// and https:// endpoints are supported"
            )
        if not u.hostname or not u.port:
            raise ValueError(f"etcd endpoint {part!r}: expected {u.scheme}://host:port")
        schemes.add(u.scheme)
        endpoints.append(f"{u.hostname}:{u.port}")
    if not endpoints:
        raise ValueError("etcd: no endpoint given")
    if len(schemes) > 1:
        raise ValueError(f"etcd {url!r}: mixes http:// and https:// endpoints")
    return endpoints, schemes == {"https"}


@dataclass(frozen=True, kw_only=True)
class EtcdTls:
    """TLS towards etcd (``https://`` URLs): the CA that signed etcd's certificate and,
    for etcd's ``--client-cert-auth``, a client certificate and key. Each one not given
    is taken from Accord's own TLS settings (``--tls-ca``, ``--tls-cert``,
    ``--tls-key``), so one development CA can serve both."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def from_env(cls) -> EtcdTls:
        """Those given to :func:`configure_etcd_tls` (the CLI's options), else
        ``ACCORD_ETCD_CA``, ``ACCORD_ETCD_CERT``, ``ACCORD_ETCD_KEY``; each one missing
        falls back to Accord's transport settings."""
        if _etcd_tls is not None:
            own = _etcd_tls
        else:

            def p(name: str) -> Path | None:
                v = os.environ.get(name)
                return Path(v) if v else None

            own = cls(ca=p("ACCORD_ETCD_CA"), cert=p("ACCORD_ETCD_CERT"), key=p("ACCORD_ETCD_KEY"))
        t = TransportSettings.from_env()
        if own.cert is None and own.key is None:
            return cls(ca=own.ca or t.ca, cert=t.cert, key=t.key)
        return cls(ca=own.ca or t.ca, cert=own.cert, key=own.key)

    def client_args(self, url: str) -> dict[str, Any]:
        """etcd3aio's TLS arguments for ``url`` (none for ``http://``)."""
        if not _parse(url)[1]:
            return {}
        if self.ca is None:
            raise StartupError(
                f"etcd {url}: an https:// URL needs the CA of etcd's certificate "
                "(--etcd-ca or --tls-ca)"
            )
        if (self.cert is None) != (self.key is None):
            raise StartupError("etcd TLS: give both --etcd-cert and --etcd-key, or neither")

        def read(f: Path) -> bytes:
            try:
                return f.read_bytes()
            except OSError as e:
                raise StartupError(f"etcd TLS: cannot read {f}: {e.strerror or e}") from None

        host = urlsplit(url.split(",")[0].strip()).hostname or ""
        return {
            "ca_cert": read(self.ca),
            "cert_key": read(self.key) if self.key else None,
            "cert_chain": read(self.cert) if self.cert else None,
            # etcd3aio dials "ipv4:..." targets: the certificate is checked against the
            # first URL's host name.
            "tls_server_name": host,
        }


_etcd_tls: EtcdTls | None = None


@contextlib.contextmanager
def configured_etcd_tls(tls: EtcdTls | None) -> Iterator[None]:
    """:func:`configure_etcd_tls` for a ``with`` block (then the previous one)."""
    previous = _etcd_tls
    configure_etcd_tls(tls)
    try:
        yield
    finally:
        configure_etcd_tls(previous)


def configure_etcd_tls(tls: EtcdTls | None) -> None:
    """Makes ``tls`` (the CLI's ``--etcd-ca``/``--etcd-cert``/``--etcd-key``) this
    process's default for every etcd client; None goes back to the environment."""
    global _etcd_tls
    _etcd_tls = tls


class Etcd:
    """The process's one etcd client; registrations and caches share its channel."""

    def __init__(self, url: str, *, tls: EtcdTls | None = None) -> None:
        self.url = url
        args = (tls or EtcdTls.from_env()).client_args(url)
        endpoints = parse_endpoints(url)
        self._client = Etcd3Client(endpoints, watch_max_reconnect_backoff_seconds=1.0, **args)
        # etcd3aio would dial every endpoint as an IPv4 literal ("ipv4:etcd:2379" does
        # not connect): host names go through gRPC's DNS resolver (channel_target).
        self._client._manager.target = channel_target(endpoints)
        # etcd3aio builds its channel from these options; without a short reconnect
        # backoff, gRPC waits up to two minutes before trying a restarted etcd again.
        self._client._manager.grpc_options += [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        self._connected = False

    @property
    def client(self) -> Etcd3Client:
        if not self._connected:
            raise RuntimeError("etcd: not connected; call connect() first")
        return self._client

    async def connect(self) -> None:
        if not self._connected:
            await self._client.connect()
            self._connected = True

    async def close(self) -> None:
        if self._connected:
            self._connected = False
            await self._client.close()

    async def wait_reachable(
        self,
        wait_s: float = DEFAULT_ETCD_WAIT_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Returns once etcd answers a read (connecting first if needed); raises
        :class:`EtcdUnreachableError` after ``wait_s`` seconds without an answer, or at
        once when the answer says this is not an etcd we can use. Logs at most one
        warning every :data:`WARN_EVERY_S` seconds meanwhile."""
        await self.connect()
        kv = self._client.kv
        assert kv is not None
        start = clock()
        throttle = Throttle()
        while True:
            left = wait_s - (clock() - start)
            try:
                await kv.get(
                    ROOT + "ping",
                    timeout=max(0.1, min(REQUEST_TIMEOUT_S, left)),
                    max_attempts=1,
                    keys_only=True,
                )
            except asyncio.CancelledError:
                raise
            except _ERRORS as e:
                if isinstance(e, grpc.aio.AioRpcError) and e.code() in _NOT_ETCD:
                    raise EtcdUnreachableError(
                        f"etcd at {self.url} refused Accord: {_short(e)}"
                    ) from None
                waited = clock() - start
                if waited >= wait_s:
                    raise EtcdUnreachableError(
                        f"etcd at {self.url} unreachable for {wait_s:g} s: {_why(e)}"
                    ) from None
                if throttle.ready(clock()):
                    log.warning(
                        "event=etcd_waiting etcd=%s waited_s=%.0f gives_up_after_s=%g error=%r",
                        self.url,
                        waited,
                        wait_s,
                        _why(e),
                    )
                await asyncio.sleep(min(0.5, max(0.0, wait_s - waited)))
                continue
            if throttle.take_skipped() or clock() - start > 1:
                log.info("event=etcd_reachable etcd=%s after_s=%.1f", self.url, clock() - start)
            return

    async def __aenter__(self) -> Etcd:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Registration:
    """Keeps ``key → value`` in etcd on a lease for as long as it runs.

    ``await reg.start()`` returns once the key is in etcd, or after ``start_timeout_s``
    with an error logged if etcd cannot be reached; a background task keeps trying, and
    then keeps the key there. :attr:`registered` tells which.
    """

    def __init__(
        self,
        etcd: Etcd,
        key: str,
        value: bytes,
        *,
        ttl_s: int = DEFAULT_TTL_S,
        start_timeout_s: float = 5.0,
    ) -> None:
        if ttl_s < 1:
            raise ValueError("registration TTL must be at least 1 second")
        self.key = key
        self._value = value
        self.ttl_s = ttl_s
        self._etcd = etcd
        self._start_timeout_s = start_timeout_s
        self._lease = 0
        self._task: asyncio.Task[None] | None = None
        self._registered = asyncio.Event()
        self._changed = asyncio.Event()

    @property
    def lease_id(self) -> int:
        return self._lease

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"etcd-registration:{self.key}"
        )
        try:
            async with asyncio.timeout(self._start_timeout_s):
                await self._registered.wait()
        except TimeoutError:
            # Serving unregistered beats not serving: the key is put as soon as etcd
            # answers.
            log.error(
                "event=not_registered key=%s etcd=%s waited_s=%.0f "
                "(still trying in the background)",
                self.key,
                self._etcd.url,
                self._start_timeout_s,
            )

    def update(self, value: bytes) -> None:
        """Changes the value; written on the current lease at once (in the background)."""
        self._value = value
        self._changed.set()

    async def _put(self) -> None:
        client = self._etcd.client
        assert client.lease is not None and client.kv is not None
        if not self._lease:
            grant = await client.lease.grant(self.ttl_s, timeout=REQUEST_TIMEOUT_S)
            self._lease = grant.ID
        try:
            await client.kv.put(self.key, self._value, lease=self._lease, timeout=REQUEST_TIMEOUT_S)
        except _ERRORS:
            # Nothing renews a lease while its key is not known to be on it: by the next
            # try it may have expired, and every put on it would then fail ("requested
            # lease not found") for as long as the process lives. Start again on a new
            # lease; this one expires on its own.
            self._lease = 0
            self._registered.clear()
            raise

    async def _holds_key(self) -> bool:
        """Whether etcd has the key on our lease now (one read of the key alone)."""
        kv = self._etcd.client.kv
        assert kv is not None
        resp = await kv.get(self.key, keys_only=True, timeout=REQUEST_TIMEOUT_S, max_attempts=1)
        return any(int(item.lease) == self._lease for item in resp.kvs)

    async def _renew(self) -> int:
        """One keepalive round trip; the TTL left (<= 0: the lease is gone)."""
        client = self._etcd.client
        assert client.lease is not None
        stream = client.lease.keep_alive(self._lease)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                async for response in stream:
                    return int(response.TTL)
        finally:
            stream.cancel()
        return 0

    async def _run(self) -> None:
        down_since: float | None = None
        check_at = 0.0
        while True:
            try:
                if not self._registered.is_set() or self._changed.is_set():
                    self._changed.clear()
                    await self._put()
                    check_at = time.monotonic() + self.ttl_s
                    if not self._registered.is_set():
                        self._registered.set()
                        log.info(
                            "event=registered key=%s lease=%x ttl=%ds",
                            self.key,
                            self._lease,
                            self.ttl_s,
                        )
                else:
                    left = await self._renew()
                    if left <= 0:
                        log.warning(
                            "event=lease_lost key=%s lease=%x action=re-register",
                            self.key,
                            self._lease,
                        )
                        self._lease = 0
                        self._registered.clear()
                        continue
                    # A live lease does not prove the key is on it (a put lost in an
                    # outage, a delete): look after any error, and once a TTL anyway.
                    if down_since is not None or time.monotonic() >= check_at:
                        if not await self._holds_key():
                            log.warning(
                                "event=key_missing key=%s lease=%x action=re-put",
                                self.key,
                                self._lease,
                            )
                            self._registered.clear()
                            continue
                        check_at = time.monotonic() + self.ttl_s
                if down_since is not None:
                    log.info(
                        "event=etcd_reachable key=%s after_s=%.1f",
                        self.key,
                        time.monotonic() - down_since,
                    )
                    down_since = None
                pause = max(self.ttl_s / 3, 0.2)
            except asyncio.CancelledError:
                raise
            except _ERRORS as e:
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("event=etcd_unreachable key=%s error=%s", self.key, _short(e))
                pause = min(1.0, max(self.ttl_s / 3, 0.2))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._changed.wait()

    async def close(self) -> None:
        """Stops renewing and revokes the lease, which deletes the key at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._lease:
            lease, self._lease = self._lease, 0
            try:
                client = self._etcd.client
                assert client.lease is not None
                await client.lease.revoke(lease, timeout=1.0, max_attempts=1)
                log.info("event=deregistered key=%s", self.key)
            except (*_ERRORS, RuntimeError) as e:
                log.warning(
                    "event=deregister_failed key=%s error=%s (the key expires with its lease)",
                    self.key,
                    _short(e),
                )


class PrefixCache:
    """Every key under a prefix, kept current by a watch. Reads never leave the process."""

    def __init__(
        self,
        etcd: Etcd,
        prefix: str,
        *,
        resync_s: float = 2.0,
        on_change: Callable[[Mapping[str, bytes]], None] | None = None,
    ) -> None:
        self.prefix = prefix
        self._etcd = etcd
        self._resync_s = resync_s
        self._on_change = on_change
        self._items: dict[str, bytes] = {}
        self._rev = 0
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._restart_watch = asyncio.Event()
        #: Monotonic time since which etcd has been unreachable (None: reachable).
        self.unreachable_since: float | None = None

    @property
    def items(self) -> Mapping[str, bytes]:
        return self._items

    @property
    def revision(self) -> int:
        return self._rev

    async def start(self, timeout_s: float = 5.0) -> None:
        """Loads the prefix; returns once the cache holds a snapshot, or after
        ``timeout_s`` with an error logged (empty until etcd answers)."""
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._resync_loop(), name=f"etcd-resync:{self.prefix}"),
            loop.create_task(self._watch_loop(), name=f"etcd-watch:{self.prefix}"),
        ]
        try:
            async with asyncio.timeout(timeout_s):
                await self._ready.wait()
        except TimeoutError:
            log.error(
                "event=etcd_unreachable prefix=%s etcd=%s waited_s=%.0f "
                "(starting with an empty cache; filled when etcd answers)",
                self.prefix,
                self._etcd.url,
                timeout_s,
            )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def resync(self) -> None:
        """One ``Range`` over the prefix; replaces the cache with what etcd holds."""
        kv = self._etcd.client.kv
        assert kv is not None
        resp = await kv.get(
            self.prefix,
            prefix_range_end(self.prefix),
            timeout=REQUEST_TIMEOUT_S,
            max_attempts=1,
        )
        rev = int(resp.header.revision)
        if rev < self._rev:
            # Either the watch applied an event after this read was answered (then a
            # second read is at least as new), or etcd lost its data (a new cluster on
            # the same addresses), and a watch resumed from our revision would wait for
            # events that never come.
            resp = await kv.get(
                self.prefix,
                prefix_range_end(self.prefix),
                timeout=REQUEST_TIMEOUT_S,
                max_attempts=1,
            )
            rev = int(resp.header.revision)
            if rev < self._rev:
                log.warning(
                    "event=etcd_revision_reset prefix=%s was=%d now=%d action=rewatch",
                    self.prefix,
                    self._rev,
                    rev,
                )
                self._restart_watch.set()
        snapshot = {kv_.key.decode(): bytes(kv_.value) for kv_ in resp.kvs}
        if snapshot != self._items:
            self._items = snapshot
            self._changed()
        self._rev = rev
        self._contact()
        self._ready.set()

    def _contact(self) -> None:
        if self.unreachable_since is not None:
            log.info(
                "event=etcd_reachable prefix=%s after_s=%.1f",
                self.prefix,
                time.monotonic() - self.unreachable_since,
            )
        self.unreachable_since = None

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self._items)

    async def _resync_loop(self) -> None:
        while True:
            try:
                await self.resync()
            except asyncio.CancelledError:
                raise
            except _ERRORS as e:
                if self.unreachable_since is None:
                    self.unreachable_since = time.monotonic()
                    log.warning(
                        "event=etcd_unreachable prefix=%s error=%s (serving from the cache)",
                        self.prefix,
                        _short(e),
                    )
            await asyncio.sleep(self._resync_s if self._ready.is_set() else 0.2)

    async def _watch_loop(self) -> None:
        await self._ready.wait()
        while True:
            self._restart_watch.clear()
            watch = asyncio.get_running_loop().create_task(self._follow(self._rev + 1))
            restart = asyncio.get_running_loop().create_task(self._restart_watch.wait())
            try:
                await asyncio.wait({watch, restart}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (watch, restart):
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, *_ERRORS):
                        await t
            if not self._restart_watch.is_set():
                await asyncio.sleep(0.5)  # the watch ended or failed: start again

    async def _follow(self, start_revision: int) -> None:
        watcher = self._etcd.client.watch
        assert watcher is not None
        async for resp in watcher.watch(
            self.prefix, prefix_range_end(self.prefix), start_revision=start_revision
        ):
            if resp.canceled:
                log.warning(
                    "event=watch_canceled prefix=%s reason=%s", self.prefix, resp.cancel_reason
                )
                return
            changed = False
            # Events of one revision (a transaction) come together: compare with the
            # revision before this response.
            floor = self._rev
            for ev in resp.events:
                rev = int(ev.kv.mod_revision)
                if rev <= floor:
                    continue  # already in the snapshot
                key = ev.kv.key.decode()
                if ev.type == ev.DELETE:
                    changed |= self._items.pop(key, None) is not None
                else:
                    self._items[key] = bytes(ev.kv.value)
                    changed = True
                self._rev = max(self._rev, rev)
            # Not resp.header.revision: the response that confirms a (re)created watch
            # carries the current revision before the events up to it are delivered.
            if changed:
                self._changed()
            self._contact()


@dataclass(frozen=True, kw_only=True)
class CoordinatorInfo:
    coordinator_id: str
    address: str
    shard: str = ""
    epoch: int = 0


def dialable(address: str) -> str:
    """``address`` if others can dial it; a wildcard host (``0.0.0.0:7070``) is not,
    and registering it would send every caller nowhere."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        raise ValueError(
            f"cannot register {address}: a wildcard address is not dialable; "
            "give the address to publish with --advertise HOST:PORT"
        )
    return address


def service_key(service: str, instance_id: str) -> str:
    return f"{SERVICES}{service}/{instance_id}"


def service_value(address: str, operations: Sequence[str] = (), version: str = "") -> bytes:
    return json.dumps(
        {"address": address, "operations": list(operations), "version": version},
        separators=(",", ":"),
    ).encode()


def coordinator_key(coordinator_id: str) -> str:
    return f"{COORDINATORS}{coordinator_id}"


def coordinator_value(address: str, shard: str, epoch: int) -> bytes:
    return json.dumps(
        {"address": address, "shard": shard, "epoch": epoch}, separators=(",", ":")
    ).encode()


def _load(value: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(value)
    except ValueError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("address"), str) else None


def parse_services(items: Mapping[str, bytes]) -> dict[str, tuple[Instance, ...]]:
    """``/accord/v1/services/<service>/<instance>`` keys → instances by service, sorted
    by instance id. Malformed values are skipped (and logged)."""
    found: dict[str, list[Instance]] = {}
    for key, value in sorted(items.items()):
        service, _, instance_id = key[len(SERVICES) :].partition("/")
        data = _load(value)
        if not service or not instance_id or data is None:
            log.warning("event=bad_registration key=%s", key)
            continue
        ops = data.get("operations") or ()
        found.setdefault(service, []).append(
            Instance(
                service=service,
                instance_id=instance_id,
                address=data["address"],
                operations=tuple(str(o) for o in ops) if isinstance(ops, list) else (),
                version=str(data.get("version", "")),
            )
        )
    return {name: tuple(insts) for name, insts in found.items()}


def parse_coordinators(items: Mapping[str, bytes]) -> list[CoordinatorInfo]:
    out = []
    for key, value in sorted(items.items()):
        data = _load(value)
        if data is None:
            continue
        out.append(
            CoordinatorInfo(
                coordinator_id=key[len(COORDINATORS) :],
                address=data["address"],
                shard=str(data.get("shard", "")),
                epoch=int(data.get("epoch", 0) or 0),
            )
        )
    return out


async def find_coordinators(url: str, timeout_s: float = 5.0) -> list[CoordinatorInfo]:
    """The live coordinators registered in etcd (one read; for short-lived clients)."""
    async with Etcd(url) as etcd:
        kv = etcd.client.kv
        assert kv is not None
        try:
            resp = await kv.get(
                COORDINATORS, prefix_range_end(COORDINATORS), timeout=timeout_s, max_attempts=2
            )
        except _ERRORS as e:
            raise ConnectionError(f"etcd at {url} unreachable: {_short(e)}") from e
        return parse_coordinators({kv_.key.decode(): bytes(kv_.value) for kv_ in resp.kvs})


class EtcdRegistry:
    """The :class:`~accord.registry.Registry` on etcd: participant services from a watched
    cache of ``/accord/v1/services/``."""

    def __init__(self, etcd: Etcd, *, resync_s: float = 2.0, own_client: bool = False) -> None:
        self.etcd = etcd
        self._own_client = own_client
        self._services: dict[str, tuple[Instance, ...]] = {}
        self._seen: set[str] = set()
        self._cache = PrefixCache(etcd, SERVICES, resync_s=resync_s, on_change=self._rebuild)

    @classmethod
    def from_url(cls, url: str, *, resync_s: float = 2.0) -> EtcdRegistry:
        return cls(Etcd(url), resync_s=resync_s, own_client=True)

    def _rebuild(self, items: Mapping[str, bytes]) -> None:
        services = parse_services(items)
        for name in services.keys() - self._services.keys():
            log.info("event=service_up service=%s instances=%d", name, len(services[name]))
        for name in self._services.keys() - services.keys():
            log.warning("event=service_down service=%s (no live instance)", name)
        self._services = services
        self._seen.update(services)

    def instances(self, service: str) -> Sequence[Instance]:
        return self._services.get(service, ())

    def known(self, service: str) -> bool:
        return service in self._seen

    def describe(self) -> str:
        since = self._cache.unreachable_since
        if since is not None:
            return (
                f"etcd at {self.etcd.url} unreachable for {time.monotonic() - since:.1f}s; "
                "answering from the last known instances"
            )
        return f"etcd at {self.etcd.url}"

    def services(self) -> dict[str, tuple[Instance, ...]]:
        return dict(self._services)

    async def start(self) -> None:
        await self.etcd.connect()
        await self._cache.start()

    async def close(self) -> None:
        await self._cache.close()
        if self._own_client:
            await self.etcd.close()


def _short(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _why(e: BaseException) -> str:
    """:func:`_short` without etcd3aio's wrapping ("EtcdConnectionError: KV.Range failed
    after 1 attempts: ...")."""
    text = _short(e)
    _, found, rest = text.partition(" attempts: ")
    return rest if found else text
