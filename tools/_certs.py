"""``accord certs``: a development CA and a certificate and key per name, for running a
topology over mutual TLS on one machine (the demo, the chaos harness and the tests use
it). Not a production PKI: the CA's key lies beside the certificates it signed.

Layout of the output directory: ``ca.pem`` and ``ca-key.pem`` (the CA), and for each
name ``NAME.pem`` and ``NAME-key.pem``. A name's certificate carries, as subject
alternative names, DNS ``NAME`` and ``localhost``, IP ``127.0.0.1`` and ``::1``, and URI
``accord:NAME``; its subject's CN is ``NAME``. It serves and calls (server and client
authentication), so one certificate per process is enough. The CA is reused when the
directory has one, so certificates issued later (a rotation, a new process) are signed
by the same CA."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The names of a demo topology's processes.
DEFAULT_NAMES = ("coordinator", "bank-a", "bank-b", "client", "query", "relay")
DEFAULT_DAYS = 30


@dataclass(frozen=True)
class Issued:
    name: str
    cert: Path
    key: Path
    serial: int


@dataclass(frozen=True)
class CertDir:
    """A directory made by :func:`make_certs`: paths of the CA and of a name's pair."""

    path: Path

    @property
    def ca(self) -> Path:
        return self.path / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.path / "ca-key.pem"

    def cert(self, name: str) -> Path:
        return self.path / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.path / f"{name}-key.pem"

    def env(self, name: str) -> dict[str, str]:
        """``ACCORD_TLS_*`` for a process holding ``name``'s certificate."""
        return {
            "ACCORD_TLS_CERT": str(self.cert(name)),
            "ACCORD_TLS_KEY": str(self.key(name)),
            "ACCORD_TLS_CA": str(self.ca),
        }


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Written beside and renamed into place, so a process re-reading it on change never
    sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_or_make_ca(
    d: CertDir, days: int, common_name: str
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if d.ca.exists() and d.ca_key.exists():
        ca = x509.load_pem_x509_certificate(d.ca.read_bytes())
        key = serialization.load_pem_private_key(d.ca_key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{d.ca_key}: not an EC key (made by accord certs?)")
        return ca, key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=max(days, 1) * 4))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    d.path.mkdir(parents=True, exist_ok=True)
    _write(d.ca_key, _key_pem(key), private=True)
    _write(d.ca, ca.public_bytes(serialization.Encoding.PEM))
    return ca, key


def issue(
    d: CertDir,
    name: str,
    *,
    days: int = DEFAULT_DAYS,
    expired: bool = False,
    ca_name: str = "Accord development CA",
) -> Issued:
    """A new key and certificate for ``name`` signed by the directory's CA (made first
    if missing). ``expired``: valid only in the past (for tests of refusal)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"certificate name {name!r}: expected a plain name such as bank-a")
    ca, ca_key = _load_or_make_ca(d, days, ca_name)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    if expired:
        start, end = now - dt.timedelta(days=2), now - dt.timedelta(days=1)
    else:
        start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    serial = x509.random_serial_number()
    sans: list[x509.GeneralName] = [
        x509.DNSName(name),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.UniformResourceIdentifier(f"accord:{name}"),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    # The key first: a server re-reading its files on change then finds a pair that
    # matches once the certificate lands (it keeps the old pair until both are new).
    _write(d.key(name), _key_pem(key), private=True)
    _write(d.cert(name), cert.public_bytes(serialization.Encoding.PEM))
    return Issued(name=name, cert=d.cert(name), key=d.key(name), serial=serial)


def make_certs(
    out: Path,
    names: Sequence[str] = DEFAULT_NAMES,
    *,
    days: int = DEFAULT_DAYS,
    expired: Sequence[str] = (),
) -> list[Issued]:
    """The CA in ``out`` (kept if there) and a certificate per name (and per ``expired``
    name, one already expired)."""
    d = CertDir(Path(out))
    issued = [issue(d, n, days=days) for n in dict.fromkeys(names) if n not in expired]
    issued += [issue(d, n, days=days, expired=True) for n in dict.fromkeys(expired)]
    return issued
