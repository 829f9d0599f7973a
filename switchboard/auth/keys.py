"""API key secrets: how they look, how they are hashed, how a header is parsed. Pure functions."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from switchboard.ids import KEY_BODY_LENGTH, random_base62

KEY_MODES = ("live", "test")
# The stored, displayable start of a key: its mode prefix and eight random characters. Enough to
# recognise a key in a listing and to narrow a lookup to (almost always) one row; far too little
# to guess the remaining 32 characters from.
DISPLAY_PREFIX_BODY = 8

_KEY_RE = re.compile(rf"pk_(live|test)_[0-9A-Za-z]{{{KEY_BODY_LENGTH}}}")  # used with fullmatch


@dataclass(frozen=True)
class NewKey:
    secret: str
    display_prefix: str
    secret_hash: bytes


def generate_key(mode: str) -> NewKey:
    if mode not in KEY_MODES:
        raise ValueError(f"key mode must be one of {KEY_MODES}")
    secret = f"pk_{mode}_{random_base62(KEY_BODY_LENGTH)}"
    return NewKey(secret, display_prefix(secret), hash_secret(secret))


def looks_like_key(candidate: str) -> bool:
    return _KEY_RE.fullmatch(candidate) is not None


def display_prefix(secret: str) -> str:
    mode_prefix_length = len("pk_live_")
    return secret[: mode_prefix_length + DISPLAY_PREFIX_BODY]


def hash_secret(secret: str) -> bytes:
    # A plain SHA-256 suffices: keys carry ~238 random bits, so there is nothing to brute-force
    # and no need for a slow password hash on every request.
    return hashlib.sha256(secret.encode()).digest()


def hashes_match(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


class MalformedAuthorization(ValueError):
    """The Authorization header is present but not `Bearer <credential>`."""


def bearer_credential(header: str) -> str:
    scheme, _, credential = header.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential or " " in credential:
        raise MalformedAuthorization("The Authorization header must be 'Bearer <API key>'.")
    return credential
