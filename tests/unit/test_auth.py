"""The token verifier (accord.common.auth) and the engine's per-caller bookkeeping:
static tokens, JWTs (valid, expired, wrong key, wrong audience, alg none, a public key
used as an HMAC secret), roles, reloads; idempotency keys, ownership and in-flight
limits per caller, surviving a replay."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from accord.common import auth
from accord.common.auth import (
    AuthConfigError,
    AuthSettings,
    PermissionDenied,
    Principal,
    Role,
    TokenRefused,
    Unauthenticated,
    check_token_destination,
)
from accord.coordinator import (
    CoordinatorConfig,
    Engine,
    Limits,
    NotFound,
    ResourceExhausted,
    RetryPolicy,
)
from accord.coordinator._specs import BranchSpec
from tests.unit._fakes import FakeCalls, FakeClock, FakeWal

CLIENT_A = "tok-client-a-0123456789"
CLIENT_B = "tok-client-b-0123456789"
ADMIN = "tok-admin-0123456789abc"
READER = "tok-reader-0123456789ab"


def bearer(token: str) -> str:
    return f"Bearer {token}"


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    p = tmp_path / "tokens"
    p.write_text(
        "# token role caller\n"
        f"{CLIENT_A} client shop-a\n"
        f"{CLIENT_B} client shop-b   # a comment\n"
        f"{ADMIN} admin ops\n"
        f"{READER} reader,client dash\n"
    )
    return p


def test_static_tokens_from_lines(tokens_file: Path) -> None:
    a = AuthSettings(tokens_file=tokens_file).build()
    assert a is not None
    p = a.authenticate(bearer(CLIENT_A))
    assert p == Principal(caller="shop-a", roles=frozenset({Role.CLIENT}))
    assert a.authenticate(f"bearer  {ADMIN} ").caller == "ops"  # scheme in any case
    assert a.authenticate(bearer(READER)).roles == {Role.READER, Role.CLIENT}
    for bad in (None, "", CLIENT_A, f"Basic {CLIENT_A}", "Bearer ", bearer(CLIENT_A + "x")):
        with pytest.raises(Unauthenticated) as e:
            a.authenticate(bad)
        assert CLIENT_A not in str(e.value)  # never echoes a token
    with pytest.raises(Unauthenticated):
        a.authenticate(bearer("x" * (auth.MAX_TOKEN_CHARS + 1)))


def test_static_tokens_from_json_and_metadata(tmp_path: Path) -> None:
    p = tmp_path / "tokens.json"
    p.write_text(
        json.dumps(
            [
                {"token": CLIENT_A, "role": "client", "caller": "shop-a"},
                {"token": ADMIN, "roles": ["admin"], "caller": "ops"},
            ]
        )
    )
    a = AuthSettings(tokens_file=p).build()
    assert a is not None
    md = [("user-agent", "x"), ("authorization", bearer(ADMIN))]
    assert a.from_metadata(md).caller == "ops"
    with pytest.raises(Unauthenticated, match="missing bearer token"):
        a.from_metadata([("user-agent", "x")])


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("short client a\n", "16 to"),
        (f"{CLIENT_A} superuser a\n", "unknown role"),
        (f"{CLIENT_A} client\n", "TOKEN ROLE"),
        (f"{CLIENT_A} client a\n{CLIENT_A} admin b\n", "twice"),
        ('{"tokens": 3}', "JSON list"),
        ("[{", "Expecting"),
    ],
)
def test_a_bad_token_file_is_one_line_at_start_up(
    tmp_path: Path, content: str, problem: str
) -> None:
    p = tmp_path / "tokens"
    p.write_text(content)
    with pytest.raises(AuthConfigError, match=problem) as e:
        AuthSettings(tokens_file=p).build()
    assert "\n" not in str(e.value) and CLIENT_A not in str(e.value)
    with pytest.raises(AuthConfigError, match="cannot read"):
        AuthSettings(tokens_file=tmp_path / "missing").build()


def test_the_token_file_is_re_read_when_it_changes(
    tokens_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "RELOAD_EVERY_S", 0.0)
    a = AuthSettings(tokens_file=tokens_file).build()
    assert a is not None
    a.authenticate(bearer(CLIENT_B))
    new = "tok-client-c-0123456789"
    tokens_file.write_text(f"{new} client shop-c\n")
    os.utime(tokens_file, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    assert a.authenticate(bearer(new)).caller == "shop-c"
    with pytest.raises(Unauthenticated):
        a.authenticate(bearer(CLIENT_B))  # revoked
    # A broken edit is ignored: the last good set stays in force.
    tokens_file.write_text("not a valid line\n")
    os.utime(tokens_file, ns=(time.time_ns(), time.time_ns() + 2_000_000_000))
    assert a.authenticate(bearer(new)).caller == "shop-c"


def test_roles() -> None:
    client = Principal(caller="a", roles=frozenset({Role.CLIENT}))
    reader = Principal(caller="r", roles=frozenset({Role.READER}))
    admin = Principal(caller="o", roles=frozenset({Role.ADMIN}))
    none = Principal(caller="n", roles=frozenset())
    client.require(Role.CLIENT)
    admin.require(Role.CLIENT)
    admin.require(Role.READER)
    reader.require(Role.CLIENT, Role.READER)
    with pytest.raises(PermissionDenied, match="lacks the admin role"):
        client.require(Role.ADMIN)
    with pytest.raises(PermissionDenied):
        reader.require(Role.CLIENT)
    with pytest.raises(PermissionDenied):
        none.require(Role.CLIENT, Role.READER)
    assert (client.scope, reader.scope, admin.scope, auth.ANONYMOUS.scope) == (
        "a",
        None,
        None,
        None,
    )


# ---------------------------------------------------------------- JWT

SECRET = b"an-hmac-secret-of-64-bytes-" + b"s" * 37


def _claims(**over: object) -> dict[str, object]:
    now = int(time.time())
    c: dict[str, object] = {
        "sub": "shop-a",
        "roles": ["client"],
        "iss": "https://issuer.test",
        "aud": "accord",
        "exp": now + 300,
        "iat": now,
    }
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


@pytest.fixture
def hmac_auth(tmp_path: Path) -> auth.Authenticator:
    key = tmp_path / "jwt.secret"
    key.write_bytes(SECRET + b"\n")
    a = AuthSettings(jwt_key=key, jwt_issuer="https://issuer.test", jwt_audience="accord").build()
    assert a is not None
    return a


def test_jwt_hmac_valid_and_roles(hmac_auth: auth.Authenticator) -> None:
    t = jwt.encode(_claims(), SECRET, algorithm="HS256")
    assert hmac_auth.authenticate(bearer(t)) == Principal(
        caller="shop-a", roles=frozenset({Role.CLIENT})
    )
    t = jwt.encode(_claims(roles=None, role="admin"), SECRET, algorithm="HS512")
    assert hmac_auth.authenticate(bearer(t)).roles == {Role.ADMIN}
    # Roles of other services are ignored; a token with none of ours is denied later.
    t = jwt.encode(_claims(roles="billing reader"), SECRET, algorithm="HS256")
    assert hmac_auth.authenticate(bearer(t)).roles == {Role.READER}
    t = jwt.encode(_claims(roles=["billing"]), SECRET, algorithm="HS256")
    with pytest.raises(PermissionDenied):
        hmac_auth.authenticate(bearer(t)).require(Role.CLIENT)


# The claims are made when the test runs, not when pytest collects it: in the whole suite
# the unit tests run many minutes after collection, past a collected token's expiry.
_EXPIRED = object()


@pytest.mark.parametrize(
    ("over", "key", "alg", "why"),
    [
        ({"exp": _EXPIRED}, SECRET, "HS256", "expired"),
        ({}, b"another-hmac-secret-of-64-bytes" + b"t" * 33, "HS256", "Signature"),
        ({"aud": "someone-else"}, SECRET, "HS256", "audience"),
        ({"iss": "https://evil.test"}, SECRET, "HS256", "issuer"),
        ({"aud": None}, SECRET, "HS256", "aud"),
        ({"exp": None}, SECRET, "HS256", "exp"),
        ({"sub": None}, SECRET, "HS256", "sub"),
    ],
)
def test_jwt_refused(
    hmac_auth: auth.Authenticator, over: dict[str, object], key: bytes, alg: str, why: str
) -> None:
    if over.get("exp") is _EXPIRED:
        over = {**over, "exp": int(time.time()) - 60}
    t = jwt.encode(_claims(**over), key, algorithm=alg)
    with pytest.raises(Unauthenticated, match=f"(?i){why}") as e:
        hmac_auth.authenticate(bearer(t))
    assert t not in str(e.value)


def test_jwt_alg_none_is_refused(hmac_auth: auth.Authenticator) -> None:
    t = jwt.encode(_claims(), None, algorithm="none")  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated):
        hmac_auth.authenticate(bearer(t))


def _pem(public: object) -> bytes:
    return public.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_jwt_rsa_and_ec_public_keys(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = tmp_path / "rsa.pem"
    pub.write_bytes(_pem(rsa_key.public_key()))
    a = AuthSettings(jwt_key=pub).build()
    assert a is not None and a.jwt is not None
    assert "HS256" not in a.jwt.algorithms
    t = jwt.encode(_claims(), rsa_key, algorithm="RS256")
    assert a.authenticate(bearer(t)).caller == "shop-a"
    # The public key used as an HMAC secret (the classic confusion attack) is refused.
    forged = jwt.encode(_claims(sub="ops", roles=["admin"]), b"x" * 32, algorithm="HS256")
    with pytest.raises(Unauthenticated):
        a.authenticate(bearer(forged))
    # A key of another kind: refused.
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(Unauthenticated):
        a.authenticate(bearer(jwt.encode(_claims(), other, algorithm="RS256")))

    ec_key = ec.generate_private_key(ec.SECP256R1())
    pub_ec = tmp_path / "ec.pem"
    pub_ec.write_bytes(_pem(ec_key.public_key()))
    a = AuthSettings(jwt_key=pub_ec).build()
    assert a is not None and a.jwt is not None and a.jwt.algorithms == ("ES256",)
    assert a.authenticate(bearer(jwt.encode(_claims(), ec_key, algorithm="ES256"))).caller


def test_jwt_key_files_refused(tmp_path: Path) -> None:
    private = tmp_path / "private.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(AuthConfigError, match="public key"):
        AuthSettings(jwt_key=private).build()
    short = tmp_path / "short"
    short.write_bytes(b"too-short")
    with pytest.raises(AuthConfigError, match="32 bytes"):
        AuthSettings(jwt_key=short).build()
    with pytest.raises(AuthConfigError, match="need --auth-jwt-key"):
        AuthSettings(jwt_audience="accord").build()
    assert AuthSettings().build() is None  # auth off


def test_both_static_tokens_and_jwts(tokens_file: Path, tmp_path: Path) -> None:
    key = tmp_path / "jwt.secret"
    key.write_bytes(SECRET)
    a = AuthSettings(tokens_file=tokens_file, jwt_key=key).build()
    assert a is not None
    assert a.authenticate(bearer(ADMIN)).caller == "ops"
    t = jwt.encode(_claims(aud=None, iss=None, sub="jwt-caller"), SECRET, algorithm="HS256")
    assert a.authenticate(bearer(t)).caller == "jwt-caller"


def test_tokens_travel_only_over_tls_or_to_loopback() -> None:
    check_token_destination("127.0.0.1:7070", secure=False)
    check_token_destination("localhost:7070", secure=False)
    check_token_destination("[::1]:7070", secure=False)
    check_token_destination("10.1.2.3:7070", secure=True)
    with pytest.raises(TokenRefused, match=r"plain text to 10\.1\.2\.3:7070"):
        check_token_destination("10.1.2.3:7070", secure=False)


def test_the_client_refuses_a_token_in_plain_text_off_loopback() -> None:
    from accord.client import AccordClient
    from accord.common.transport import TransportSettings

    with pytest.raises(TokenRefused):
        AccordClient("10.1.2.3:7070", token=CLIENT_A, transport=TransportSettings())


# ---------------------------------------------------------------- engine, per caller

CFG = CoordinatorConfig(
    retry=RetryPolicy(initial_s=0.001, max_s=0.002),
    phase_two_wait_s=1.0,
    limits=Limits(max_inflight_per_caller=2),
)


def _engine(wal: FakeWal | None = None) -> Engine:
    return Engine(wal=wal or FakeWal(), calls=FakeCalls(), config=CFG, clock=FakeClock())


def _branches() -> list[BranchSpec]:
    return [
        BranchSpec(service="bank-a", operation="debit", payload=b"1"),
        BranchSpec(service="bank-b", operation="credit", payload=b"1"),
    ]


async def test_idempotency_keys_ownership_and_limits_per_caller() -> None:
    wal = FakeWal()
    e = _engine(wal)
    a = await e.execute(key="order-1", timeout_ms=0, branches=_branches(), caller="shop-a")
    b = await e.execute(key="order-1", timeout_ms=0, branches=_branches(), caller="shop-b")
    assert a.gid != b.gid  # the same key from two callers: two transactions
    again = await e.execute(key="order-1", timeout_ms=0, branches=_branches(), caller="shop-a")
    assert again is a
    assert e.table.gid_for_key("order-1", "shop-b") == b.gid
    assert e.table.gid_for_key("order-1") is None  # no caller "" used it
    # Another caller's gid is NOT_FOUND, the same as an unknown one.
    assert e.get(a.gid, caller="shop-a") is a
    with pytest.raises(NotFound):
        e.get(a.gid, caller="shop-b")
    assert e.get(a.gid) is a  # no caller: anyone's (auth off, admins, readers)
    listed, _ = e.list([], 100, "", caller="shop-b")
    assert [t.gid for t in listed] == [b.gid]

    # In flight per caller: two ACTIVE for shop-a, the third is refused; shop-b is not.
    await e.begin(key="", timeout_ms=0, caller="shop-a")
    await e.begin(key="", timeout_ms=0, caller="shop-a")
    with pytest.raises(ResourceExhausted, match=r"shop-a.*limit 2 per caller"):
        await e.begin(key="", timeout_ms=0, caller="shop-a")
    await e.begin(key="", timeout_ms=0, caller="shop-b")
    await e.begin(key="", timeout_ms=0)  # the caller "" (auth off) has no such limit
    await e.begin(key="", timeout_ms=0)
    await e.begin(key="", timeout_ms=0)
    assert e.table.inflight_of("shop-a") == 2

    # The caller survives a replay (WAL records), and so do its keys and its count.
    e2 = _engine()
    e2.replay(None, [(n, rt, p) for n, rt, p, _ in wal.records])
    assert e2.get(a.gid).caller == "shop-a"
    assert e2.table.gid_for_key("order-1", "shop-a") == a.gid
    assert e2.table.gid_for_key("order-1", "shop-b") == b.gid
    assert e2.table.inflight_of("shop-a") == 2
    with pytest.raises(NotFound):
        e2.get(a.gid, caller="shop-b")
    await e2.close()
    await e.close()


# ---------------------------------------------------------------- the query service


async def test_the_console_api_needs_a_reader_and_its_actions_an_admin(
    tokens_file: Path, tmp_path: Path
) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from accord.query._app import QueryApp
    from accord.query._http import ConsoleOptions, build_http_app
    from accord.query._store import SqliteStore

    backend = QueryApp(SqliteStore(tmp_path / "q.db"))
    await backend.start()
    verifier = AuthSettings(tokens_file=tokens_file).build()
    app = build_http_app(backend, console=ConsoleOptions(actions=True, auth=verifier))
    client: TestClient = TestClient(TestServer(app))  # type: ignore[type-arg]
    await client.start_server()
    try:
        assert (await client.get("/healthz")).status in (200, 503)  # open
        assert (await client.get("/")).status == 200  # a page holds no data: open
        resp = await client.get("/api/transactions")
        assert resp.status == 401 and (await resp.json())["code"] == "UNAUTHENTICATED"
        hdr = {"Authorization": bearer(CLIENT_A)}
        assert (await client.get("/api/transactions", headers=hdr)).status == 403
        hdr = {"Authorization": bearer(READER)}
        assert (await client.get("/api/transactions", headers=hdr)).status == 200
        # The cookie (a browser's EventSource sends no headers).
        client.session.cookie_jar.update_cookies({"accord_token": ADMIN})
        cfg = await client.get("/api/config")
        assert cfg.status == 200
        csrf = (await cfg.json())["csrf_token"]
        client.session.cookie_jar.clear()
        post = {"json": {"gid": "0-x"}, "headers": {"X-CSRF-Token": csrf, **hdr}}
        resp = await client.post("/api/actions/retry", **post)  # type: ignore[arg-type]
        assert resp.status == 403 and "admin" in (await resp.json())["error"]
        post["headers"] = {"X-CSRF-Token": csrf, "Authorization": bearer(ADMIN)}
        resp = await client.post("/api/actions/retry", **post)  # type: ignore[arg-type]
        assert resp.status == 404  # authorised: the gid is unknown to the read model
    finally:
        await client.close()
        await backend.stop()
