"""Identifiers (SPEC section 1): a type prefix plus a random base62 body, and UTC timestamps."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ID_BODY_LENGTH = 22  # ~131 bits: unguessable, so ids never need to be secret to be safe
KEY_BODY_LENGTH = 40

PREFIXES = frozenset(
    {"ws", "key", "agt", "call", "trn", "conv", "msg", "evt", "whk", "del", "req", "st"}
)

# Always used with fullmatch: `$` would also match before a final newline, which would let
# "call_...\n" through to a NATS subject.
_ID_RE = re.compile(r"(?P<prefix>[a-z]+)_(?P<body>[0-9A-Za-z]{16,64})")


UNBIASED_BELOW = 248  # 4 x 62: a byte under it maps to each character equally often


def random_base62(length: int) -> str:
    # One read of the OS's randomness per id (`secrets.choice` made one per character, 22
    # system calls for every request id); bytes of 248 and above are skipped, not folded in.
    chars: list[str] = []
    while len(chars) < length:
        for byte in secrets.token_bytes(length + 8):
            if byte < UNBIASED_BELOW:
                chars.append(BASE62[byte % 62])
                if len(chars) == length:
                    break
    return "".join(chars)


def new_id(prefix: str) -> str:
    """A fresh id such as `call_3kT...`; `prefix` must be one of SPEC section 1."""
    if prefix not in PREFIXES:
        raise ValueError(f"unknown id prefix {prefix!r}")
    return f"{prefix}_{random_base62(ID_BODY_LENGTH)}"


def is_id(value: str, prefix: str) -> bool:
    """True when `value` is a well-formed id of the given type (it may still not exist)."""
    match = _ID_RE.fullmatch(value)
    return match is not None and match.group("prefix") == prefix


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso_ms(moment: datetime) -> str:
    """ISO 8601 UTC with milliseconds and a `Z`, the one timestamp format of the API."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def parse_iso(value: str) -> datetime:
    """Parses the API's timestamp format (or any ISO 8601 with an offset) to an aware datetime."""
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError("timestamp has no UTC offset")
    return moment.astimezone(UTC)
