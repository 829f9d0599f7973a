"""Resume (SPEC 5.4): where a stream starts (its cursor, checked against what the bus holds),
and the replay of what the client missed, seamed to the live frames with no gap and no
duplicate: the live subscription is made first, the replay reads the stored frames up to the
end, and the writer then skips the live copies of what the replay sent (by sequence). If live
frames were dropped while the replay ran, the replay reads on past them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl

from nats.aio.client import Client
from nats.js.client import JetStreamContext
from starlette.types import Scope

from switchboard.bus.stored import Stored, message_at, stored_after
from switchboard.live.cursor import parse_cursor
from switchboard.live.outbox import Frame, Outbox
from switchboard.outage import BusUnavailable

CURSOR_UNKNOWN = "cursor_unknown"
CURSOR_EXPIRED = "cursor_expired"


@dataclass(frozen=True)
class Start:
    """Replay the frames after sequence `after` (0: from the first), or, when `after` is None,
    go live at once (after saying `reset` first when `reset` names why)."""

    after: int | None
    reset: str | None = None


LIVE = Start(None)


def query_value(scope: Scope, name: str) -> str | None:
    pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    values = [value for key, value in pairs if key == name]
    return values[-1] if values else None


def requested_cursor(scope: Scope) -> str | None:
    """`Last-Event-ID` (what EventSource sends by itself on a reconnect) wins over
    `?last_event_id=` (a first connection's)."""
    for name, value in scope.get("headers", []):
        if name == b"last-event-id":
            return str(value.decode("latin-1"))
    return query_value(scope, "last_event_id")


async def locate(
    client: Client,
    js: JetStreamContext,
    stream: str,
    text: str,
    belongs: Callable[[str], bool],
    history: timedelta,
) -> Start:
    """Where a cursor says to start, or a reset: unknown when it is not one of this stream's
    frames, expired when its frame is older than the history kept."""
    cursor = parse_cursor(text, stream)
    if cursor is None:
        return Start(None, CURSOR_UNKNOWN)
    stored = await message_at(client, stream, cursor.seq)
    if stored is None:
        try:
            first = (await js.stream_info(stream)).state.first_seq
        except Exception as failure:
            raise BusUnavailable(f"could not read {stream}: {type(failure).__name__}") from None
        return Start(None, CURSOR_EXPIRED if cursor.seq < first else CURSOR_UNKNOWN)
    if not belongs(stored.subject):
        return Start(None, CURSOR_UNKNOWN)
    if datetime.now(UTC) - stored.stored_at > history:
        return Start(None, CURSOR_EXPIRED)
    return Start(cursor.seq)


# The frames one stored message becomes for a client, with the cursor of the last of them.
FramesOf = Callable[[Stored], tuple[Sequence[Frame], str | None]]
SendFrames = Callable[[Sequence[Frame]], Awaitable[None]]


async def replay(
    client: Client,
    stream: str,
    subject: str,
    after: int,
    outbox: Outbox,
    frames_of: FramesOf,
    send_frames: SendFrames,
) -> int:
    """Sends the frames stored on `subject` after `after`, a page at a time, then marks the
    seam in `outbox`; returns how many frames it sent."""
    last = after
    sent = 0
    while True:
        page: list[Frame] = []
        async for stored in stored_after(client, stream, subject, last):
            frames, cursor = frames_of(stored)
            page.extend(frames)
            if cursor is not None:
                outbox.last_cursor = cursor
            last = stored.seq
            if len(page) >= 64:
                await send_frames(page)
                sent += len(page)
                page = []
        if page:
            await send_frames(page)
            sent += len(page)
        # Live frames dropped while we read: they are stored, so read on past them.
        if not outbox.discard_for_replay():
            break
    outbox.skip_through = last
    return sent
