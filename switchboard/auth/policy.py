"""Which paths take `?token=` and which are streams free of the write deadline (SPEC 2, 6).
Pure functions over method and path, so the rule lives in one place and is tested on its own."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

_CALL_TRANSCRIPT_STREAM = re.compile(r"^/v1/calls/[^/]+/transcript/stream$")
_CALL_EVENT_STREAM = re.compile(r"^/v1/calls/[^/]+/stream$")
_CONVERSATION_STREAM = re.compile(r"^/v1/conversations/[^/]+/stream$")

QUERY_PARAM_REFUSED = (
    "A ?token= query parameter is accepted only on GET /v1/calls/{id}/transcript/stream and "
    "GET /v1/calls/{id}/stream; send the key in the Authorization header instead."
)


def query_token_allowed(method: str, path: str) -> bool:
    """The two call stream paths, whose browser clients (EventSource, WebSocket) cannot set
    headers; everywhere else a URL-borne key is refused because URLs leak into logs and history."""
    return method == "GET" and bool(
        _CALL_TRANSCRIPT_STREAM.match(path) or _CALL_EVENT_STREAM.match(path)
    )


def is_stream_path(path: str) -> bool:
    """The three long-lived stream paths, exempt from the write deadline."""
    return bool(
        _CALL_TRANSCRIPT_STREAM.match(path)
        or _CALL_EVENT_STREAM.match(path)
        or _CONVERSATION_STREAM.match(path)
    )


def stream_call_id(path: str) -> str | None:
    """The call id in a call stream path, or None for any other path."""
    for pattern in (_CALL_TRANSCRIPT_STREAM, _CALL_EVENT_STREAM):
        if pattern.match(path):
            return path.split("/")[3]
    return None


def query_tokens(query_string: bytes) -> list[str]:
    """Every `token` value in a raw query string (a repeated or empty one still counts)."""
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    return [value for name, value in pairs if name == "token"]
