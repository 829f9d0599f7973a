"""`switchboard tail`: a terminal view of a live stream. Partials rewrite the current line in
place; finals settle on their own line. Without a terminal (a pipe, a file) only finals and
events are printed, one per line. The client resumes across reconnects by itself; each reconnect
is reported on stderr (so a silent terminal is not mistaken for a quiet call), and so is a cursor
the server no longer knew, since something may be missing above it."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

import httpx

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


def render_reconnecting(url: str, cursor: str | None) -> str:
    resuming = f", resuming after {cursor}" if cursor else ""
    return f"-- reconnecting to {url}{resuming}\n"


def render_reconnected(url: str) -> str:
    return f"-- reconnected to {url}\n"


class ReconnectNotices:
    """Writes to `err` when the stream reconnects and when it is back. It watches the client's
    HTTP requests (every stream request after the first is a reconnect), so it sees every cause
    alike: a dropped connection, a draining server, a gap to recover."""

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.requests = 0
        self.reconnecting = False

    def watch(self, http: httpx.AsyncClient) -> None:
        hooks = http.event_hooks
        hooks["request"] = [*hooks.get("request", []), self.on_request]
        hooks["response"] = [*hooks.get("response", []), self.on_response]
        http.event_hooks = hooks

    async def on_request(self, request: httpx.Request) -> None:
        self.requests += 1
        if self.requests > 1:
            self.reconnecting = True
            self._write(render_reconnecting(_base(request), request.headers.get("last-event-id")))

    async def on_response(self, response: httpx.Response) -> None:
        if self.reconnecting and response.status_code in (200, 204):
            self.reconnecting = False
            self._write(render_reconnected(_base(response.request)))

    def _write(self, text: str) -> None:
        self.err.write(text)
        self.err.flush()


def _base(request: httpx.Request) -> str:
    """The server's base URL: never the query (a cursor, a filter) nor anything secret."""
    return str(request.url.copy_with(username=None, password=None, path="", query=None))


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
        ReconnectNotices(err).watch(client.http)
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
