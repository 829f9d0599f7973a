"""Signatures (SPEC section 8), pure: the Voicebip header, HMAC-SHA256 of "{timestamp}.{body}"
keyed with the endpoint secret as shown, and the Standard Webhooks headers, keyed with the
base64-decoded part of the same `whsec_...` secret, so stock verifiers work unchanged."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def voicebip_signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"sha256={mac}"


def standard_signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def delivery_headers(
    secrets_in_use: list[str], event_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """Headers for one attempt; during a rotation `secrets_in_use` is [current, previous] and
    both sign (Standard Webhooks lists several signatures separated by spaces)."""
    current = secrets_in_use[0]
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Switchboard-Webhooks/1",
        "X-Voicebip-Event-ID": event_id,
        "X-Voicebip-Timestamp": str(timestamp),
        "X-Voicebip-Signature": voicebip_signature(current, timestamp, body),
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(
            standard_signature(s, event_id, timestamp, body) for s in secrets_in_use
        ),
    }
    if len(secrets_in_use) > 1:
        headers["X-Voicebip-Signature-Previous"] = voicebip_signature(
            secrets_in_use[1], timestamp, body
        )
    return headers
