"""Transport security across real processes: every link over mutual TLS (etcd over
https with client certificates too), certificates from ``accord certs``' code, and what
must be refused: another CA, an expired certificate, plain text, a coordinator not on a
participant's allow-list, a process with a valid certificate of another name posing as a
coordinator, a participant whose certificate does not name the service it was resolved
for. Rotation: a server's certificate replaced while it runs is served to new
connections."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

import accord.v1 as pb
from accord.client import AccordClient, Branch
from accord.common.transport import TransportSettings, configured, make_channel
from accord.registry import Etcd, EtcdTls
from accord.tools._certs import CertDir, issue, make_certs
from accord.tools.topology import (
    EtcdServer,
    ManagedProcess,
    PostgresServer,
    ProcessFailed,
    Topology,
    accord_argv,
    balances,
)
from tests.integration._bank_helpers import branch

pytestmark = pytest.mark.integration

BANKS = ("bank-a", "bank-b")


class Secured:
    """etcd (https, client certificates required), two banks accepting branch calls
    only from ``coordinator``, and a coordinator, all over mutual TLS."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.certs = CertDir(root / "certs")
        self.topology = Topology(root, certs=self.certs)
        self.etcd: EtcdServer = self.topology.etcd()
        self.banks: dict[str, ManagedProcess] = {
            name: self.topology.bank(
                name,
                etcd=self.etcd.url,
                instance_id=name,
                ttl_s=5,
                accounts=3,
                initial_balance=100,
            )
            for name in BANKS
        }
        self.coordinator = self.topology.coordinator(etcd=self.etcd.url)

    def client(self) -> TransportSettings:
        return self.topology.transport("client")


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    s = None
    topo_root = tmp_path_factory.mktemp("tls")
    try:
        s = Secured(topo_root)
        yield s
    finally:
        if s is not None:
            s.topology.stop()
        else:  # a failed start: stop whatever did start
            Topology(topo_root).stop()


def transfer(i: int, amount: int = 1) -> list[Branch]:
    return [
        Branch(
            service="bank-a", operation="debit", payload={"account": "bank-a-0", "amount": amount}
        ),
        Branch(
            service="bank-b", operation="credit", payload={"account": "bank-b-0", "amount": amount}
        ),
    ]


async def totals(s: Secured) -> dict[str, tuple[int, int]]:
    """Per bank: (total, prepared branches)."""
    out = {}
    with configured(s.client()):  # the admin API is over mutual TLS too
        for name, p in s.banks.items():
            r = await balances(p.address)
            out[name] = (r.total, r.prepared_branches)
    return out


async def call_status(
    settings: TransportSettings, address: str, server_name: str = ""
) -> grpc.StatusCode:
    """The status of one Participant call made with ``settings`` (OK or its error)."""
    async with make_channel(address, settings, server_name=server_name) as ch:
        try:
            await pb.ParticipantStub(ch).Prepare(
                branch("g-probe", "b1", "debit", "bank-a-1", 1), timeout=5
            )
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


async def test_a_transfer_over_mutual_tls_through_etcd_over_https(secured: Secured) -> None:
    assert secured.etcd.url.startswith("https://")
    with configured(secured.client()):
        async with await AccordClient.from_etcd(secured.etcd.url) as client:
            result = await client.execute(transfer(1), idempotency_key="tls-1")
        assert result.committed, result
        # etcd refuses a client without a certificate (--client-cert-auth).
        etcd = Etcd(secured.etcd.url, tls=_etcd_tls_without_cert(secured))
        with pytest.raises(Exception, match=r"unreachable|refused|UNAVAILABLE"):
            await etcd.wait_reachable(2)
        await etcd.close()


def _etcd_tls_without_cert(s: Secured) -> EtcdTls:
    # A CA but no client certificate (EtcdTls falls back to the transport's, so give a
    # certificate of a CA etcd does not trust instead).
    other = CertDir(s.root / "other-ca")
    make_certs(other.path, ["stranger"])
    return EtcdTls(ca=s.certs.ca, cert=other.cert("stranger"), key=other.key("stranger"))


async def test_certificates_of_another_ca_expired_or_none_are_refused(secured: Secured) -> None:
    address = secured.banks["bank-a"].address
    other = CertDir(secured.root / "other-ca")
    make_certs(other.path, ["coordinator"])
    issue(secured.certs, "old-coordinator", expired=True)
    stranger = TransportSettings(
        cert=other.cert("coordinator"), key=other.key("coordinator"), ca=secured.certs.ca
    )
    expired = TransportSettings(
        cert=secured.certs.cert("old-coordinator"),
        key=secured.certs.key("old-coordinator"),
        ca=secured.certs.ca,
    )
    # Another CA's certificate, though it says "coordinator": the handshake fails.
    assert await call_status(stranger, address) == grpc.StatusCode.UNAVAILABLE
    # An expired certificate of the right CA: refused too.
    assert await call_status(expired, address) == grpc.StatusCode.UNAVAILABLE
    # Plain text to a TLS server fails.
    async with grpc.aio.insecure_channel(address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await pb.ParticipantStub(ch).Prepare(
                branch("g-plain", "b1", "debit", "bank-a-1", 1), timeout=5
            )
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (await totals(secured))["bank-a"][1] == 0


async def test_a_caller_with_a_valid_certificate_of_another_name_cannot_commit(
    secured: Secured,
) -> None:
    """A process holding a CA-signed certificate that is not a coordinator's ("client")
    calls the participant's Prepare and Commit itself: PERMISSION_DENIED, nothing
    prepared, no money moved; its admin API (not a branch call) still answers."""
    address = secured.banks["bank-a"].address
    before = await totals(secured)
    async with make_channel(address, secured.client()) as ch:
        stub = pb.ParticipantStub(ch)
        for call in (stub.Prepare, stub.Commit):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call(branch("g-forged", "b1", "debit", "bank-a-1", 50), timeout=5)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "not allowed" in (e.value.details() or "")
    assert await totals(secured) == before
    assert before["bank-a"][1] == 0


async def test_a_coordinator_not_on_the_allow_list_is_refused(secured: Secured) -> None:
    """A real coordinator process whose certificate names "rogue": each branch call is
    refused (PERMISSION_DENIED, nothing prepared), so its transaction aborts."""
    proc = secured.topology.process(
        "rogue",
        accord_argv(
            [
                "coordinator",
                *("--listen", "127.0.0.1:0"),
                *("--wal-dir", str(secured.root / "wal-rogue")),
                *("--id", "rogue"),
                f"--service=bank-a={secured.banks['bank-a'].address}",
                f"--service=bank-b={secured.banks['bank-b'].address}",
                *("--retry-max-s", "0.2"),
            ]
        ),
        cert="rogue",
    )
    secured.topology.start(proc)
    before = await totals(secured)
    with configured(secured.client()):
        async with AccordClient(proc.address) as client:
            result = await client.execute(transfer(2), timeout_ms=1500)
    assert not result.committed
    assert await totals(secured) == before
    log = (secured.root / "rogue.log").read_text()
    assert "PERMISSION_DENIED: caller not allowed" in log
    proc.kill()  # its abort keeps being refused: no graceful wait


async def test_a_participant_must_present_the_name_of_its_service(secured: Secured) -> None:
    """The coordinator dials a service with the service's name as the TLS target name:
    a process whose (valid) certificate names another service is not talked to."""
    address_b = secured.banks["bank-b"].address
    settings = secured.topology.transport("coordinator")
    # Named right: the call goes through (a no vote: bank-b has no such account).
    assert (
        await call_status(settings, address_b, server_name="bank-b") != grpc.StatusCode.UNAVAILABLE
    )
    # bank-b's certificate does not name bank-a: the handshake fails (UNAVAILABLE).
    assert (
        await call_status(settings, address_b, server_name="bank-a") == grpc.StatusCode.UNAVAILABLE
    )


async def test_a_rotated_certificate_is_served_to_new_connections(secured: Secured) -> None:
    bank = secured.banks["bank-b"]
    host, port = bank.address.rsplit(":", 1)

    def serial() -> int:
        ctx = ssl.create_default_context(cafile=str(secured.certs.ca))
        ctx.load_cert_chain(secured.certs.cert("client"), secured.certs.key("client"))
        with (
            socket.create_connection((host, int(port)), timeout=5) as sock,
            ctx.wrap_socket(sock, server_hostname="bank-b") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    old = await asyncio.to_thread(serial)
    new = issue(secured.certs, "bank-b")  # the files replaced in place, bank-b running
    assert await asyncio.to_thread(serial) == new.serial != old
    # The coordinator (its channel opened before) and new clients still get through.
    with configured(secured.client()):
        async with await AccordClient.from_etcd(secured.etcd.url) as client:
            result = await client.execute(transfer(3), idempotency_key="tls-rotated")
    assert result.committed, result


def test_the_demo_over_mutual_tls_conserves_money(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            *accord_argv(["demo"]),
            "--tls",
            "--transfers",
            "100",
            "--json",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["tls"] is True and summary["registry"].startswith("etcd at https://")
    assert summary["total_before"] == summary["total_after"]
    assert summary["committed"] > 0 and not summary["errors"]
    assert (tmp_path / "certs" / "ca.pem").exists()


def test_a_short_chaos_run_over_mutual_tls_has_no_violations(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            *accord_argv(["chaos"]),
            "--duration",
            "10",
            "--tls",
            "--coordinators",
            "1",
            "--participants",
            "2",
            "--json",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-2000:]
    report = json.loads(out.stdout)
    assert report["violations"] == [] or report["violations"] == 0
    assert report["ok"] > 0
    assert report["settings"]["tls"] is True


def test_a_participant_on_postgresql_over_verified_tls(tmp_path: Path) -> None:
    """The postgresql:// URL goes to psycopg as given: with sslmode=verify-full and the
    CA, the bank's connections are TLS (pg_stat_ssl says so); with another CA, it does
    not start (one line)."""
    import psycopg

    certs = CertDir(tmp_path / "certs")
    make_certs(certs.path, ["postgres"])
    with Topology(tmp_path) as topo:
        pg = PostgresServer(tmp_path, tls=(certs.cert("postgres"), certs.key("postgres"), certs.ca))
        topo.start(pg)
        url = pg.create_database("bank_a")
        tls_url = f"{url}?sslmode=verify-full&sslrootcert={certs.ca}"
        bank = topo.bank("bank-a", db=tls_url, accounts=2, initial_balance=5)
        with psycopg.connect(tls_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_activity a "
                "JOIN pg_stat_ssl s USING (pid) WHERE a.datname = 'bank_a' AND a.pid <> "
                "pg_backend_pid()"
            ).fetchone()
        assert row is not None and row[1] > 0 and row[0] == row[1], row
        bank.stop(10)
        other = CertDir(tmp_path / "other-ca")
        make_certs(other.path, ["x"])
        wrong = topo.bank(
            "bank-wrong",
            db=f"{url}?sslmode=verify-full&sslrootcert={other.ca}",
            start=False,
        )
        with pytest.raises(ProcessFailed, match="certificate verify failed"):
            wrong.start(30)


def test_the_cli_takes_the_tls_options(secured: Secured) -> None:
    """`accord txn` with --tls-cert/--tls-key/--tls-ca reaches the coordinator; without
    them it cannot (the server wants TLS and a client certificate)."""
    cert, key, ca = secured.topology.cert("client")
    address = secured.coordinator.address
    tls = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCORD_")}
    ok = subprocess.run(
        [*accord_argv(["txn", "list", "--coordinator", address, "--json", *tls])],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "transactions" in json.loads(ok.stdout)
    plain = subprocess.run(
        [*accord_argv(["txn", "list", "--coordinator", address, "--json"])],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert plain.returncode != 0
    assert plain.stderr.startswith("error:") and len(plain.stderr.strip().splitlines()) == 1
