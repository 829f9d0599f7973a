"""`switchboard tail`: a terminal view of a live stream. Partials rewrite the current line in
place; finals settle on their own line. Without a terminal (a pipe, a file) only finals and
events are printed, one per line."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from switchboard.client.streams import SwitchboardClient

CLEAR_LINE = "\r\x1b[2K"


def render_turn(turn: dict[str, Any], tty: bool) -> str | None:
    """What to write for a turn, or None to write nothing."""
    line = f"{turn['role']:>5}: {turn['text']}"
    if tty:
        return CLEAR_LINE + line + ("\n" if turn["is_final"] else "")
    return line + "\n" if turn["is_final"] else None


def render_envelope(envelope: dict[str, Any]) -> str:
    payload = envelope.get("payload", {})
    if envelope.get("event_type", "").startswith("message."):
        detail = f"{payload.get('direction')} {payload.get('status')}: {payload.get('text')}"
    elif envelope.get("event_type") == "conversation.mode_changed":
        detail = f"{payload.get('from_mode')} -> {payload.get('to_mode')}"
    else:
        detail = str(payload)
    return f"{envelope.get('timestamp', '')} {envelope.get('event_type')} {detail}\n"


async def tail(url: str, key: str, stream_id: str, out: TextIO = sys.stdout) -> None:
    tty = out.isatty()
    async with SwitchboardClient(url, key) as client:
        if stream_id.startswith("call_"):
            async for turn in client.transcript(stream_id):
                text = render_turn(turn, tty)
                if text:
                    out.write(text)
                    out.flush()
            out.write("-- call ended\n")
        else:
            async for envelope in client.conversation(stream_id):
                out.write(render_envelope(envelope))
                out.flush()
