"""Page tokens of ListTransactions: opaque to clients, checked here.

A token is keyset pagination state: the sort key and gid of the last row of the page
(the next page starts strictly after them), the order, a digest of the filter it was
made for, and, for the duration order, the "now" the first page measured unfinished
transactions' ages with (so pages do not shift as time passes). It is base64url of a
JSON object with a format version, signed with the store's own key (HMAC-SHA256), so a
token from another store, an edited one, or one for a different filter or order is
refused with INVALID_ARGUMENT instead of silently returning the wrong page.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass

import accord.v1 as pb
from accord.query._errors import InvalidArgument

VERSION = 1


@dataclass(frozen=True, kw_only=True)
class Cursor:
    order: int
    key: int
    gid: str
    now_ms: int = 0


def filter_digest(flt: pb.TransactionFilter, order: int) -> str:
    data = flt.SerializeToString(deterministic=True) + b"|" + str(order).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def _sign(secret: bytes, body: bytes) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()[:24]


def encode(cursor: Cursor, flt: pb.TransactionFilter, secret: bytes) -> str:
    doc = {
        "v": VERSION,
        "o": cursor.order,
        "k": cursor.key,
        "g": cursor.gid,
        "n": cursor.now_ms,
        "f": filter_digest(flt, cursor.order),
    }
    body = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    doc["s"] = _sign(secret, body)
    raw = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, flt: pb.TransactionFilter, order: int, secret: bytes) -> Cursor:
    """The cursor in ``token``; InvalidArgument unless this store made it for this
    filter and order."""
    bad = InvalidArgument(
        "page_token is not a token this query service made (pass next_page_token unchanged)"
    )
    if len(token) > 2048:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        doc = json.loads(raw)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise bad from None
    if not isinstance(doc, dict) or not isinstance(doc.get("s"), str):
        raise bad
    if doc.get("v") != VERSION:
        raise InvalidArgument(f"page_token has format version {doc.get('v')!r}; expected {VERSION}")
    sig = doc.pop("s")
    body = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    if not hmac.compare_digest(sig, _sign(secret, body)):
        raise bad
    try:
        cursor = Cursor(
            order=int(doc["o"]), key=int(doc["k"]), gid=str(doc["g"]), now_ms=int(doc["n"])
        )
    except (KeyError, TypeError, ValueError):
        raise bad from None
    if cursor.order != order or doc.get("f") != filter_digest(flt, order):
        raise InvalidArgument(
            "page_token was made for a different filter or order; "
            "repeat the request that returned it, changing only page_token"
        )
    return cursor
