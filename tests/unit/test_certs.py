"""``accord certs``: a development CA and a certificate per name, with the names the
identity checks look for."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
from pathlib import Path

from cryptography import x509
from typer.testing import CliRunner

from accord.tools._certs import DEFAULT_NAMES, CertDir, issue, make_certs
from accord.tools.cli import app


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_each_name_gets_a_certificate_naming_it_signed_by_one_ca(tmp_path: Path) -> None:
    issued = make_certs(tmp_path, ["coordinator", "bank-a"], days=3)
    d = CertDir(tmp_path)
    ca = _load(d.ca)
    assert [i.name for i in issued] == ["coordinator", "bank-a"]
    cert = _load(d.cert("bank-a"))
    assert cert.issuer == ca.subject
    ca.verify_directly_issued_by(ca)
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["bank-a", "localhost"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["accord:bank-a"]
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=2) < left <= dt.timedelta(days=3)
    # The key matches the certificate (what a server loads), and is private to its owner.
    ssl.create_default_context().load_cert_chain(d.cert("bank-a"), d.key("bank-a"))
    assert d.key("bank-a").stat().st_mode & 0o077 == 0


def test_the_ca_is_kept_and_a_reissued_certificate_is_new(tmp_path: Path) -> None:
    d = CertDir(tmp_path)
    first = make_certs(tmp_path, ["bank-a"])[0]
    ca = d.ca.read_bytes()
    again = issue(d, "bank-a")
    assert d.ca.read_bytes() == ca
    assert again.serial != first.serial == first.serial
    assert _load(d.cert("bank-a")).serial_number == again.serial


def test_an_expired_certificate_on_request(tmp_path: Path) -> None:
    make_certs(tmp_path, ["a"], expired=["old"])
    cert = _load(CertDir(tmp_path).cert("old"))
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC)


def test_the_command_makes_the_default_set(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    result = CliRunner().invoke(app, ["certs", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert [c["name"] for c in doc["certificates"]] == list(DEFAULT_NAMES)
    for name in DEFAULT_NAMES:
        assert (out / f"{name}.pem").exists() and (out / f"{name}-key.pem").exists()
    bad = CliRunner().invoke(app, ["certs", "--out", str(out), "--name", "../x"])
    assert bad.exit_code == 1
