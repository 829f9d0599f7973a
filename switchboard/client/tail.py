"""`switchboard tail`: a terminal view of a live stream. Partials rewrite the current line in
place; finals settle on their own line. Without a terminal (a pipe, a file) only finals and
events are printed, one per line. The client resumes across reconnects by itself; a cursor the
server no longer knew is reported on stderr, since something may be missing above it."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

from switchboard.client.streams import SwitchboardClient

CLEAR_LINE = "\r\x1b[2K"
WORKSPACE = "events"  # the stream id that names the workspace-wide stream


def render_turn(turn: dict[str, Any], tty: bool) -> str | None:
    """What to write for a turn, or None to write nothing."""
    line = f"{turn['role']:>5}: {turn['text']}"
    if tty:
        return CLEAR_LINE + line + ("\n" if turn["is_final"] else "")
    return line + "\n" if turn["is_final"] else None


def render_envelope(envelope: dict[str, Any], *, with_source: bool = False) -> str:
    """One line an event; `with_source` names its call or conversation (the workspace stream
    mixes them)."""
    payload = envelope.get("payload", {})
    if envelope.get("event_type", "").startswith("message."):
        detail = f"{payload.get('direction')} {payload.get('status')}: {payload.get('text')}"
    elif envelope.get("event_type") == "conversation.mode_changed":
        detail = f"{payload.get('from_mode')} -> {payload.get('to_mode')}"
    else:
        detail = str(payload)
    source = envelope.get("call_id") or envelope.get("conversation_id")
    where = f" {source}" if with_source and source else ""
    return f"{envelope.get('timestamp', '')}{where} {envelope.get('event_type')} {detail}\n"


def render_reset(reason: str) -> str:
    return f"-- the server could not resume ({reason}): frames may be missing above\n"


async def tail(
    urls: str | Sequence[str],
    key: str,
    stream_id: str,
    out: TextIO = sys.stdout,
    *,
    err: TextIO = sys.stderr,
    from_start: bool = False,
    event_types: Sequence[str] = (),
) -> None:
    tty = out.isatty()

    def on_reset(reason: str) -> None:
        err.write(render_reset(reason))
        err.flush()

    async with SwitchboardClient(urls, key) as client:
        if stream_id.startswith("call_"):
            turns = client.transcript(stream_id, from_start=from_start, on_reset=on_reset)
            async for turn in turns:
                text = render_turn(turn, tty)
                if text:
                    out.write(text)
                    out.flush()
            out.write("-- call ended\n")
            return
        if stream_id == WORKSPACE:
            envelopes = client.events(event_types, on_reset=on_reset)
        else:
            envelopes = client.conversation(stream_id, on_reset=on_reset)
        async for envelope in envelopes:
            out.write(render_envelope(envelope, with_source=stream_id == WORKSPACE))
            out.flush()
