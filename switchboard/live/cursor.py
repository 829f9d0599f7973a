"""Cursors (SPEC 5.4): a frame's position, valid on every replica because it is the sequence
number JetStream gave the frame's message, and later for every later frame of a call or a
conversation. Opaque to clients: `t<seq>` on the transcript stream (stream VB_TRANSCRIPTS),
`e<seq>` on the envelope streams (VB_EVENTS). The call WebSocket uses each envelope's
`event_id` instead, as SPEC 5.3 says. Pure: parsing and printing."""

from __future__ import annotations

import re
from dataclasses import dataclass

from switchboard.events import EVENTS_STREAM, TRANSCRIPTS_STREAM

PREFIXES = {TRANSCRIPTS_STREAM: "t", EVENTS_STREAM: "e"}
_SHAPE = re.compile(r"([te])([1-9][0-9]{0,18})")
MAX_SEQ = 2**63 - 1


@dataclass(frozen=True)
class Cursor:
    stream: str
    seq: int

    def __str__(self) -> str:
        return f"{PREFIXES[self.stream]}{self.seq}"


def cursor_text(stream: str, seq: int) -> str:
    return f"{PREFIXES[stream]}{seq}"


def parse_cursor(text: str, stream: str) -> Cursor | None:
    """The cursor `text` names in `stream`, or None when it is not one of that stream's (the
    caller answers `reset` with `cursor_unknown`, never an error: SPEC 5.4)."""
    match = _SHAPE.fullmatch(text)
    if match is None or match.group(1) != PREFIXES[stream]:
        return None
    seq = int(match.group(2))
    return Cursor(stream, seq) if seq <= MAX_SEQ else None
