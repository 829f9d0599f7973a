"""The client's resume bookkeeping as pure values (SPEC 5.4): the cursor a stream holds, what it
sends when it (re)connects, and what each SSE frame or WebSocket message asks the stream to do.
The I/O around it lives in `streams.py`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from switchboard.client.sse import SseEvent

RECONNECTABLE_CODES = ("UNAVAILABLE", "INTERNAL")  # drain or a server fault: try elsewhere
RETRYABLE_STATUSES = (502, 503, 504)  # a replica or its bus is down, or a proxy found none


@dataclass
class Position:
    """Where a stream stands. `cursor` is the opaque id of the last frame received (SSE `id:`,
    a WebSocket envelope's `event_id`); every reconnect sends it back. `from_start` asks the
    first connection of a transcript for the whole call so far (never once a cursor exists,
    which would repeat turns). The holes the server reported are counted, not hidden."""

    cursor: str | None = None
    from_start: bool = False
    resets: list[str] = field(default_factory=list)  # reasons, in the order they came
    gaps: int = 0
    dropped: int = 0
    seen: set[str] = field(default_factory=set)  # WebSocket event ids already yielded

    def sse_request(self) -> tuple[dict[str, str], dict[str, str]]:
        """The headers and query parameters of the next SSE request."""
        if self.cursor is not None:
            return {"Last-Event-ID": self.cursor}, {}
        if self.from_start:
            return {}, {"from": "start"}
        return {}, {}

    def socket_query(self) -> dict[str, str]:
        """The query parameters of the next WebSocket connection."""
        return {} if self.cursor is None else {"last_event_id": self.cursor}


# What a frame asks of the stream.


@dataclass(frozen=True)
class Frame:
    """Yield this to the caller."""

    data: dict[str, Any]


@dataclass(frozen=True)
class Skip:
    """Nothing for the caller (a heartbeat, a control frame already accounted for)."""


@dataclass(frozen=True)
class End:
    """The stream is over for good (`event: end`; 204 and close 1000 are seen by the shell)."""


@dataclass(frozen=True)
class Reconnect:
    """This connection is done but the stream is not (drain, server fault): go elsewhere, with
    backoff, and resume from the cursor. A draining server may say how long to wait (its
    `retry:` hint, jittered per client so that they do not all come back at once): then that."""

    delay: float | None = None


@dataclass(frozen=True)
class Resume:
    """Frames were dropped for this slow client: reconnect now, to the same server, from the
    cursor, to get the durable ones back."""


@dataclass(frozen=True)
class Reset:
    """The server did not know the cursor (or it had expired) and went on live: the caller may
    have missed frames."""

    reason: str


@dataclass(frozen=True)
class Fail:
    """A terminal error: raise it."""

    error_code: str
    message: str


Step = Frame | Skip | End | Reconnect | Resume | Reset | Fail


def _object(data: str | None) -> dict[str, Any]:
    """A control frame's body; one we cannot read counts as empty rather than ending a stream."""
    try:
        value = orjson.loads(data or "{}")
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _gap(position: Position, body: dict[str, Any]) -> None:
    position.gaps += 1
    dropped = body.get("dropped")
    position.dropped += dropped if isinstance(dropped, int) else 0
    resume_from = body.get("resume_from")
    if isinstance(resume_from, str) and resume_from:
        position.cursor = resume_from


def sse_step(position: Position, event: SseEvent) -> Step:
    """What an SSE event means, updating the position as `EventSource` would: any event with an
    `id:` line moves the cursor (an empty one clears it)."""
    if event.id is not None:
        position.cursor = event.id or None
    if event.comment is not None:
        return Skip()
    if event.event == "end":
        return End()
    if event.event == "error":
        error = _object(event.data)
        code = str(error.get("error_code", "INTERNAL"))
        if code in RECONNECTABLE_CODES:
            return Reconnect(None if event.retry is None else event.retry / 1000)
        return Fail(code, str(error.get("message", "")))
    if event.event == "gap":
        _gap(position, _object(event.data))
        # Without a cursor a reconnect would only be live again: nothing to get back.
        return Resume() if position.cursor is not None or position.from_start else Skip()
    if event.event == "reset":
        reason = str(_object(event.data).get("reason", "unknown"))
        position.resets.append(reason)
        return Reset(reason)
    if event.event not in (None, "message") or event.data is None:
        return Skip()  # a named event this client does not know yet
    frame = orjson.loads(event.data)
    return Frame(frame) if isinstance(frame, dict) else Skip()


def socket_step(position: Position, message: dict[str, Any]) -> Step:
    """What a WebSocket text message means (command results are the shell's business). An
    envelope seen before is skipped: a reconnect's replay can overlap what was yielded."""
    event_type = message.get("event_type")
    if event_type == "stream.gap":
        _gap(position, message)
        return Resume()  # with no cursor yet the socket replays the call so far: still complete
    if event_type == "stream.reset":
        reason = str(message.get("reason", "unknown"))
        position.resets.append(reason)
        return Reset(reason)
    event_id = message.get("event_id")
    if not isinstance(event_id, str):
        return Skip()  # not an envelope: a control message this client does not know yet
    if event_id in position.seen:
        return Skip()
    position.seen.add(event_id)
    position.cursor = event_id
    return Frame(message)


def close_delay(reason: str) -> float | None:
    """The reconnect delay a draining server puts at the end of a close reason (`... in 2345
    ms`), in seconds."""
    words = reason.split()
    if len(words) >= 3 and words[-3] == "in" and words[-1] == "ms" and words[-2].isdigit():
        return int(words[-2]) / 1000
    return None


def error_of(status: int, body: bytes) -> tuple[str, str]:
    """The error code and message of a refused request; a proxy's page is not our envelope."""
    error = _object(body.decode("utf-8", "replace"))
    code = error.get("error_code")
    if isinstance(code, str):
        return code, str(error.get("message", ""))
    return f"HTTP_{status}", f"the server answered {status}"
