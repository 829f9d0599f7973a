"""Wire formats of the streams (SPEC section 5), as pure functions over bytes and values:
SSE frames, the terminal of each kind of ending, and the WebSocket command parser."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson

SSE_RETRY_MS = 3000
SSE_HEARTBEAT = b": keep-alive\n\n"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
    (b"referrer-policy", b"no-referrer"),
    (b"connection", b"keep-alive"),
]


def sse_retry(milliseconds: int = SSE_RETRY_MS) -> bytes:
    return b"retry: %d\n\n" % milliseconds


def sse_data(cursor: str, data: bytes) -> bytes:
    """An unnamed event with an `id:` (its cursor) and one `data:` line; `data` must be
    single-line JSON (orjson never emits a raw newline)."""
    return b"id: %s\ndata: %s\n\n" % (cursor.encode(), data)


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps(data))


class Ending(Enum):
    """Why a stream ends, and how each transport says it."""

    CALL_COMPLETED = "call_completed"
    REVOKED = "revoked"
    TOKEN_EXPIRED = "token_expired"  # noqa: S105 - a reason, not a secret
    DRAINING = "draining"
    INTERNAL = "internal"
    BINARY_FRAME = "binary_frame"  # WebSocket only: the client sent binary data


@dataclass(frozen=True)
class Terminal:
    ending: Ending
    # A drain's suggestion of when this client should reconnect, jittered per client: SSE says
    # it with a `retry:` field in the terminal event (EventSource obeys it), the WebSocket in
    # its close reason.
    retry_ms: int | None = None

    def sse(self) -> bytes:
        if self.ending is Ending.CALL_COMPLETED:
            return sse_event("end", {"reason": "call_completed"})
        code, message = _SSE_ERRORS[self.ending]
        frame = sse_event("error", {"error_code": code, "message": message})
        # One event: the field sets the reconnect delay as it is read, before the error fires.
        return frame if self.retry_ms is None else b"retry: %d\n" % self.retry_ms + frame

    def websocket_close(self) -> tuple[int, str]:
        code, reason = _WS_CLOSES[self.ending]
        if self.retry_ms is not None:
            reason = f"{reason} in {self.retry_ms} ms"
        return code, reason


_SSE_ERRORS = {
    Ending.REVOKED: ("UNAUTHENTICATED", "The API key of this stream was revoked."),
    Ending.TOKEN_EXPIRED: ("UNAUTHENTICATED", "The stream token expired."),
    Ending.DRAINING: ("UNAVAILABLE", "The server is restarting; reconnect."),
    Ending.INTERNAL: ("INTERNAL", "An internal error ended the stream."),
    Ending.BINARY_FRAME: ("INVALID_ARGUMENT", "Binary frames are not accepted."),
}

_WS_CLOSES = {
    Ending.CALL_COMPLETED: (1000, "call ended"),
    Ending.REVOKED: (1008, "key revoked"),
    Ending.TOKEN_EXPIRED: (1008, "token expired"),
    Ending.DRAINING: (1012, "server draining; reconnect"),
    Ending.INTERNAL: (1011, "internal error"),
    Ending.BINARY_FRAME: (1003, "binary frames are not accepted"),
}


# --- WebSocket commands (client to server) ---------------------------------------------------

# Matched with fullmatch: `$` would also match before a final "\n", letting "12\n" through.
DTMF_DIGITS = re.compile(r"[0-9*#A-D]{1,32}")
MAX_REQUEST_ID = 128


@dataclass(frozen=True)
class SendDtmf:
    digits: str
    request_id: str


@dataclass(frozen=True)
class Listen:
    """Start sending this socket the call's live audio (SPEC 5.3, "Listening")."""

    request_id: str


@dataclass(frozen=True)
class Unlisten:
    request_id: str


Command = SendDtmf | Listen | Unlisten


@dataclass(frozen=True)
class CommandError:
    request_id: str | None
    error_code: str
    message: str


def parse_command(text: str) -> Command | CommandError:
    """A client message to a command, or the error its sender gets back (never an exception)."""
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError:
        return CommandError(None, "INVALID_ARGUMENT", "The message is not valid JSON.")
    if not isinstance(message, dict):
        return CommandError(None, "INVALID_ARGUMENT", "The message must be a JSON object.")
    request_id = message.get("request_id")
    if not isinstance(request_id, str) or not 1 <= len(request_id) <= MAX_REQUEST_ID:
        return CommandError(
            None, "INVALID_ARGUMENT", "request_id must be a string of 1 to 128 characters."
        )
    action = message.get("action")
    if action == "listen":
        return Listen(request_id)
    if action == "unlisten":
        return Unlisten(request_id)
    if action != "send_dtmf":
        return CommandError(
            request_id,
            "INVALID_ARGUMENT",
            f"Unknown action {action!r}: send_dtmf, listen or unlisten.",
        )
    digits = message.get("digits")
    if not isinstance(digits, str) or not DTMF_DIGITS.fullmatch(digits):
        return CommandError(
            request_id, "INVALID_ARGUMENT", "digits must be 1 to 32 of 0-9, *, #, A-D."
        )
    return SendDtmf(digits, request_id)


def command_result(
    request_id: str | None, ok: bool, error_code: str | None = None, message: str | None = None
) -> str:
    body: dict[str, Any] = {"event_type": "command.result", "request_id": request_id, "ok": ok}
    if not ok:
        body["error_code"] = error_code
        body["message"] = message
    return orjson.dumps(body).decode()


# --- resume notices (SPEC 5.4) -----------------------------------------------------------------


def sse_gap(dropped: int, resume_from: str | None) -> bytes:
    return sse_event("gap", {"dropped": dropped, "resume_from": resume_from})


def ws_gap(dropped: int, resume_from: str | None) -> str:
    body = {"event_type": "stream.gap", "dropped": dropped, "resume_from": resume_from}
    return orjson.dumps(body).decode()


def sse_reset(reason: str) -> bytes:
    return sse_event("reset", {"reason": reason})


def ws_reset(reason: str) -> str:
    return orjson.dumps({"event_type": "stream.reset", "reason": reason}).decode()
