"""Stream tokens (SPEC section 2): short-lived, signed credentials scoped to one call, so a
browser can watch a call without holding the long-lived key. Pure: sign and verify.

Format: `st_` + base64url(JSON claims) + `.` + base64url(HMAC-SHA256(secret, claims)). The
claims name the workspace, the call, the issuing key (revoking it ends the token too) and the
expiry in Unix seconds."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass

import orjson

PREFIX = "st_"
MIN_TTL = 10
MAX_TTL = 3600


@dataclass(frozen=True)
class StreamClaims:
    workspace_id: str
    call_id: str
    key_id: str
    expires_at: int


class InvalidStreamToken(ValueError):
    """Not a token we signed, or expired; the message is safe to show."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(secret: bytes, claims: StreamClaims) -> str:
    body = _b64(
        orjson.dumps(
            {
                "w": claims.workspace_id,
                "c": claims.call_id,
                "k": claims.key_id,
                "e": claims.expires_at,
            }
        )
    )
    mac = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    return f"{PREFIX}{body}.{_b64(mac)}"


def verify(secret: bytes, token: str, now: float) -> StreamClaims:
    if not token.startswith(PREFIX) or token.count(".") != 1:
        raise InvalidStreamToken("The stream token is malformed.")
    body, _, mac = token[len(PREFIX) :].partition(".")
    expected = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    try:
        valid = hmac.compare_digest(_unb64(mac), expected)
        data = orjson.loads(_unb64(body)) if valid else None
    except (binascii.Error, ValueError):
        raise InvalidStreamToken("The stream token is malformed.") from None
    if data is None:
        raise InvalidStreamToken("The stream token is not valid.")
    claims = StreamClaims(str(data["w"]), str(data["c"]), str(data["k"]), int(data["e"]))
    if claims.expires_at <= now:
        raise InvalidStreamToken("The stream token has expired.")
    return claims
