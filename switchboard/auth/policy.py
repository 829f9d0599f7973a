"""Which paths take `?token=` and which are streams free of the write deadline (SPEC 2, 6), and
which query parameters carry a credential. Pure functions over method, path and query string, so
the rule lives in one place and is tested on its own."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote

# Always used with fullmatch: `$` would also match before a final newline.
_CALL_TRANSCRIPT_STREAM = re.compile(r"/v1/calls/[^/]+/transcript/stream")
_CALL_EVENT_STREAM = re.compile(r"/v1/calls/[^/]+/stream")
_CONVERSATION_STREAM = re.compile(r"/v1/conversations/[^/]+/stream")
WORKSPACE_STREAM = "/v1/events/stream"

QUERY_PARAM_REFUSED = (
    "A ?token= query parameter is accepted only on GET /v1/calls/{id}/transcript/stream and "
    "GET /v1/calls/{id}/stream; send the key in the Authorization header instead."
)
OTHER_CREDENTIAL_REFUSED = (
    "Only ?token= (lowercase) carries a credential in a URL, and only on the call stream paths; "
    "send the key in the Authorization header instead."
)

# Query parameter names that carry a credential, compared after percent-decoding and in any
# case: `token` is the one the two call stream paths accept; the others are what clients and
# libraries commonly send (OAuth's access_token, api_key). A key in any of them has already
# leaked into the URL, so it is refused rather than ignored.
CREDENTIAL_NAMES = frozenset(
    {
        "token",
        "access_token",
        "auth_token",
        "api_key",
        "apikey",
        "api-key",
        "key",
        "authorization",
        "bearer",
    }
)
# Values shaped like an API key or a stream token, under whatever name.
_CREDENTIAL_VALUE = re.compile(r"\s*(pk_(live|test)_|st_)", re.IGNORECASE)
_DECODE_ROUNDS = 3  # enough to see through double and triple percent-encoding


def query_token_allowed(method: str, path: str) -> bool:
    """The two call stream paths, whose browser clients (EventSource, WebSocket) cannot set
    headers; everywhere else a URL-borne key is refused because URLs leak into logs and history."""
    return method == "GET" and bool(
        _CALL_TRANSCRIPT_STREAM.fullmatch(path) or _CALL_EVENT_STREAM.fullmatch(path)
    )


def is_stream_path(path: str) -> bool:
    """The four long-lived stream paths, exempt from the write deadline."""
    return bool(
        path == WORKSPACE_STREAM
        or _CALL_TRANSCRIPT_STREAM.fullmatch(path)
        or _CALL_EVENT_STREAM.fullmatch(path)
        or _CONVERSATION_STREAM.fullmatch(path)
    )


def stream_call_id(path: str) -> str | None:
    """The call id in a call stream path, or None for any other path."""
    for pattern in (_CALL_TRANSCRIPT_STREAM, _CALL_EVENT_STREAM):
        if pattern.fullmatch(path):
            return path.split("/")[3]
    return None


def _pairs(query_string: bytes) -> list[tuple[str, str]]:
    return parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)


def query_tokens(query_string: bytes) -> list[str]:
    """Every `token` value in a raw query string (a repeated or empty one still counts). The
    name is compared after percent-decoding, as every URL parser reads it: `tok%65n` is `token`."""
    return [value for name, value in _pairs(query_string) if name == "token"]


def fully_decoded(text: str) -> str:
    """`text` percent-decoded until it stops changing (a few rounds at most)."""
    for _ in range(_DECODE_ROUNDS):
        decoded = unquote(text)
        if decoded == text:
            break
        text = decoded
    return text


def is_credential_name(name: str) -> bool:
    return fully_decoded(name).strip().lower() in CREDENTIAL_NAMES


def other_query_credentials(query_string: bytes) -> bool:
    """True when the query holds a credential-looking parameter other than exactly `token`:
    another name in any case or encoding (`TOKEN`, `access_token`, `%2574oken`), or a value
    shaped like a key or stream token under any other name."""
    for name, value in _pairs(query_string):
        if name == "token":
            continue
        if is_credential_name(name) or _CREDENTIAL_VALUE.match(fully_decoded(value)):
            return True
    return False
