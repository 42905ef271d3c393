"""Who may do what: bearer tokens and roles, shared by the coordinator and the query
service (one verifier, so both answer the same token the same way).

A client call carries ``authorization: Bearer <token>`` (gRPC metadata, or the HTTP
header). A token is one of:

- a *static token*, listed in a file (``--auth-tokens FILE``): JSON
  (``[{"token": ..., "role": "client", "caller": "shop"}, ...]``, ``roles`` a list also
  accepted) or lines ``TOKEN ROLE[,ROLE] CALLER-ID`` (``#`` starts a comment). Compared in
  constant time (against a digest of every entry, no early exit). The file is re-read
  when it changes (checked at most once a second); a change that does not parse is
  ignored with a warning, and the previous set stays in force.
- a *JWT*, verified with a configured key (``--auth-jwt-key FILE``: a PEM public key,
  or an HMAC secret). The algorithms are pinned by the key's type (HS256/384/512 for a
  secret, RS/PS for RSA, ES for the key's curve, EdDSA), never ``none`` nor one the key
  was not meant for; ``exp`` and ``sub`` are required, ``iss`` and ``aud`` when
  configured. ``sub`` is the caller's identity; roles come from a ``roles`` claim (a list
  or a space-separated string) or ``role``.

Roles (see the README's "Callers and roles"): ``client`` starts and drives its own
transactions and reads only those; ``reader`` reads everything (lists, the event feed,
the query service) and changes nothing; ``admin`` may do everything, operator actions
included.

Nothing here logs a token, or any part of one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from accord.common.exits import ExitCode, StartupError

log = logging.getLogger("accord.auth")

__all__ = [
    "ANONYMOUS",
    "AuthConfigError",
    "AuthSettings",
    "Authenticator",
    "JwtKey",
    "PermissionDenied",
    "Principal",
    "Role",
    "StaticTokens",
    "TokenRefused",
    "Unauthenticated",
    "bearer_metadata",
    "check_token_destination",
    "env_token_metadata",
    "http_authorization",
]

#: A token longer than this is refused before any work is done on it.
MAX_TOKEN_CHARS = 8192
#: How often a token or key file is checked for a change (seconds).
RELOAD_EVERY_S = 1.0
#: Clock skew allowed on ``exp``/``nbf``/``iat`` (seconds).
JWT_LEEWAY_S = 5
#: Verified JWTs remembered (until they expire, or the key changes).
JWT_CACHE_SIZE = 4096


class Role(StrEnum):
    CLIENT = "client"
    READER = "reader"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: ``caller`` (the identity transactions are recorded under) and
    its roles. ``admin`` implies every other role."""

    caller: str
    roles: frozenset[Role]

    def has(self, *roles: Role) -> bool:
        """Holds one of ``roles`` (admin holds all)."""
        return Role.ADMIN in self.roles or any(r in self.roles for r in roles)

    @property
    def sees_all(self) -> bool:
        """Reads every caller's transactions (admin, reader, or no auth at all)."""
        return self.has(Role.READER)

    @property
    def scope(self) -> str | None:
        """The caller whose transactions it may see and drive; None: everyone's."""
        return None if self.sees_all else self.caller

    def require(self, *roles: Role) -> None:
        if not self.has(*roles):
            names = " or ".join(r.value for r in roles)
            raise PermissionDenied(f"caller {self.caller!r} lacks the {names} role")


#: Auth is off: every call is allowed, and recorded under the caller "".
ANONYMOUS = Principal(caller="", roles=frozenset({Role.ADMIN}))


class Unauthenticated(Exception):
    """No token, or one that is not valid (gRPC UNAUTHENTICATED, HTTP 401)."""


class PermissionDenied(Exception):
    """A valid token whose roles do not allow the call (PERMISSION_DENIED, HTTP 403)."""


class AuthConfigError(StartupError, ValueError):
    """A token file or key that cannot be used (one line at start-up)."""

    code = ExitCode.USAGE


class TokenRefused(StartupError, ValueError):
    """A client would send its token in plain text off loopback."""

    code = ExitCode.USAGE


def _roles(value: Any, where: str) -> frozenset[Role]:
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise ValueError(f"{where}: roles must be a name or a list of names")
    out = set()
    for r in value:
        try:
            out.add(Role(r))
        except ValueError:
            raise ValueError(f"{where}: unknown role {r!r} (one of {', '.join(Role)})") from None
    return frozenset(out)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class _Watched:
    """A file re-read when it changes (mtime, size or inode), checked at most every
    :data:`RELOAD_EVERY_S` seconds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self) -> None:
        """First load: any problem is an :class:`AuthConfigError`."""
        try:
            stamp = self._stat()
            self.parse(self.path.read_bytes())
        except OSError as e:
            raise AuthConfigError(f"cannot read {self.path}: {e.strerror or e}") from None
        except ValueError as e:
            raise AuthConfigError(f"{self.path}: {e}") from None
        self._stamp = stamp
        self._checked = time.monotonic()

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_EVERY_S:
            return
        with self._lock:
            self._checked = now
            try:
                stamp = self._stat()
                if stamp == self._stamp:
                    return
                self.parse(self.path.read_bytes())
            except (OSError, ValueError) as e:
                # The message never quotes the file's content (it holds secrets).
                log.warning("event=auth_reload_failed file=%s error=%r", self.path, str(e))
                return
            self._stamp = stamp
            log.info("event=auth_reloaded file=%s", self.path)

    def parse(self, data: bytes) -> None:
        raise NotImplementedError


class StaticTokens(_Watched):
    """Static tokens from a file (see the module docstring for the formats)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._entries: list[tuple[bytes, Principal]] = []
        self.load()

    def parse(self, data: bytes) -> None:
        text = data.decode("utf-8")
        if text.lstrip().startswith(("[", "{")):
            entries = self._parse_json(json.loads(text))
        else:
            entries = self._parse_lines(text)
        seen: set[bytes] = set()
        for d, _ in entries:
            if d in seen:
                raise ValueError("the same token is listed twice")
            seen.add(d)
        self._entries = entries

    @staticmethod
    def _entry(token: Any, roles: Any, caller: Any, where: str) -> tuple[bytes, Principal]:
        if not isinstance(token, str) or len(token) < 16 or len(token) > MAX_TOKEN_CHARS:
            raise ValueError(f"{where}: a token must be a string of 16 to {MAX_TOKEN_CHARS} chars")
        if any(c.isspace() for c in token):
            raise ValueError(f"{where}: a token cannot hold white space")
        if not isinstance(caller, str) or not caller:
            raise ValueError(f"{where}: a caller id is required")
        return _digest(token), Principal(caller=caller, roles=_roles(roles, where))

    def _parse_json(self, doc: Any) -> list[tuple[bytes, Principal]]:
        if isinstance(doc, dict):
            doc = doc.get("tokens")
        if not isinstance(doc, list):
            raise ValueError('expected a JSON list of {"token", "role", "caller"} objects')
        out = []
        for i, d in enumerate(doc, 1):
            if not isinstance(d, dict):
                raise ValueError(f"entry {i}: not an object")
            roles = d.get("roles", d.get("role"))
            out.append(self._entry(d.get("token"), roles, d.get("caller"), f"entry {i}"))
        return out

    def _parse_lines(self, text: str) -> list[tuple[bytes, Principal]]:
        out = []
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 3:
                raise ValueError(f"line {n}: expected TOKEN ROLE[,ROLE] CALLER-ID")
            out.append(self._entry(parts[0], parts[1], parts[2], f"line {n}"))
        return out

    def verify(self, token: str) -> Principal | None:
        self.refresh()
        want = _digest(token)
        found: Principal | None = None
        for d, principal in self._entries:  # every entry, no early exit
            if hmac.compare_digest(d, want):
                found = principal
        return found


#: The algorithms a key of each kind may verify (never "none", never HS with a public key).
_HMAC_ALGS = ("HS256", "HS384", "HS512")
_RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_ALGS = {"secp256r1": ("ES256",), "secp384r1": ("ES384",), "secp521r1": ("ES512",)}


class JwtKey(_Watched):
    """A JWT verifier: the key file (PEM public key or HMAC secret), pinned algorithms,
    and the issuer and audience required (when given)."""

    def __init__(self, path: Path, *, issuer: str = "", audience: str = "") -> None:
        super().__init__(path)
        self.issuer = issuer
        self.audience = audience
        self._key: Any = None
        self.algorithms: tuple[str, ...] = ()
        #: Tokens verified already, by digest: their caller and expiry (a JWT is only
        #: ever revoked by changing the key, which empties it). Decoding one costs about
        #: 200 us; a hit, a hash and a look-up.
        self._verified: dict[bytes, tuple[Principal, float]] = {}
        self.load()

    def parse(self, data: bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        if data.lstrip().startswith(b"-----BEGIN"):
            if b"PRIVATE KEY" in data:
                raise ValueError("a JWT key must be a public key (or an HMAC secret)")
            key = load_pem_public_key(data.strip())
            if isinstance(key, rsa.RSAPublicKey):
                algs: tuple[str, ...] = _RSA_ALGS
            elif isinstance(key, ec.EllipticCurvePublicKey):
                curve_algs = _EC_ALGS.get(key.curve.name)
                if curve_algs is None:
                    raise ValueError(f"unsupported EC curve {key.curve.name}")
                algs = curve_algs
            elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
                algs = ("EdDSA",)
            else:
                raise ValueError(f"unsupported public key type {type(key).__name__}")
            self._key, self.algorithms = key, algs
            self._verified = {}
            return
        secret = data.strip()
        if len(secret) < 32:
            raise ValueError("an HMAC secret must be at least 32 bytes")
        self._key, self.algorithms = secret, _HMAC_ALGS
        self._verified = {}

    def verify(self, token: str) -> Principal:
        import jwt

        self.refresh()
        d = _digest(token)
        hit = self._verified.get(d)
        if hit is not None and hit[1] > time.time():
            return hit[0]
        required = ["exp", "sub"]
        if self.issuer:
            required.append("iss")
        if self.audience:
            required.append("aud")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=list(self.algorithms),
                issuer=self.issuer or None,
                audience=self.audience or None,
                leeway=JWT_LEEWAY_S,
                options={"require": required, "verify_aud": bool(self.audience)},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired") from None
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"invalid token: {_jwt_reason(e)}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise Unauthenticated("invalid token: no subject")
        raw = claims.get("roles", claims.get("role", []))
        names = raw.replace(",", " ").split() if isinstance(raw, str) else raw
        # Roles this service does not know (another service's) are ignored.
        known = {r.value for r in Role}
        roles = frozenset(Role(r) for r in (names if isinstance(names, list) else []) if r in known)
        principal = Principal(caller=sub, roles=roles)
        if len(self._verified) >= JWT_CACHE_SIZE:
            self._verified.clear()
        exp = claims["exp"]
        if isinstance(exp, int | float):
            self._verified[d] = (principal, float(exp))
        return principal


def _jwt_reason(e: Exception) -> str:
    """PyJWT's message, which never quotes the token."""
    return str(e) or type(e).__name__


@dataclass(frozen=True, kw_only=True)
class AuthSettings:
    """The options every server that checks tokens takes (``--auth-tokens``,
    ``--auth-jwt-key``, ``--auth-jwt-issuer``, ``--auth-jwt-audience``). Neither file
    given: auth is off (:meth:`build` gives None)."""

    tokens_file: Path | None = None
    jwt_key: Path | None = None
    jwt_issuer: str = ""
    jwt_audience: str = ""

    @property
    def enabled(self) -> bool:
        return self.tokens_file is not None or self.jwt_key is not None

    def build(self) -> Authenticator | None:
        if not self.enabled:
            if self.jwt_issuer or self.jwt_audience:
                raise AuthConfigError("--auth-jwt-issuer/--auth-jwt-audience need --auth-jwt-key")
            return None
        static = StaticTokens(self.tokens_file) if self.tokens_file is not None else None
        jwt_key = (
            JwtKey(self.jwt_key, issuer=self.jwt_issuer, audience=self.jwt_audience)
            if self.jwt_key is not None
            else None
        )
        return Authenticator(static=static, jwt=jwt_key)


@dataclass(kw_only=True)
class Authenticator:
    """Turns an ``authorization`` value into a :class:`Principal`, or raises
    :class:`Unauthenticated`. Static tokens are tried first, then the JWT key."""

    static: StaticTokens | None = None
    jwt: JwtKey | None = None

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated("missing bearer token (authorization: Bearer <token>)")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the authorization value must be 'Bearer <token>'")
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthenticated(f"the token is longer than {MAX_TOKEN_CHARS} characters")
        if self.static is not None:
            found = self.static.verify(token)
            if found is not None:
                return found
        if self.jwt is not None and token.count(".") == 2:
            return self.jwt.verify(token)
        raise Unauthenticated("unknown token")

    def from_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        """From gRPC invocation metadata (keys are lower case)."""
        value: str | None = None
        for k, v in metadata or ():
            if k == "authorization":
                value = v.decode() if isinstance(v, bytes) else v
                break
        return self.authenticate(value)


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The metadata that carries ``token`` (empty for no token)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def env_token_metadata() -> tuple[tuple[str, str], ...]:
    """The metadata of the process's own token (``ACCORD_TOKEN``; ``--token`` of
    ``accord query`` and ``accord relay`` sets it): how the services that follow a
    coordinator's feed (Subscribe, a reader's call) authenticate."""
    return bearer_metadata(os.environ.get("ACCORD_TOKEN", ""))


def http_authorization(headers: Mapping[str, str], cookies: Mapping[str, str]) -> str | None:
    """An HTTP request's ``Authorization`` value, or ``Bearer <cookie accord_token>``
    (a browser's EventSource cannot send headers)."""
    value = headers.get("Authorization")
    if value:
        return value
    cookie = cookies.get("accord_token")
    return f"Bearer {cookie}" if cookie else None


def check_token_destination(address: str, *, secure: bool) -> None:
    """Tokens go only over TLS or to loopback: :class:`TokenRefused` otherwise."""
    from accord.common.transport import is_loopback

    if not secure and not is_loopback(address):
        raise TokenRefused(
            f"refusing to send a token in plain text to {address}: use TLS "
            "(ACCORD_TLS_CA) or a loopback address"
        )
