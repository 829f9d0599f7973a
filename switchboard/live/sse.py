"""The two SSE streams (SPEC 5.1 and 5.2), as raw ASGI endpoints: subscribe first, then read
state, then one writer loop per client that drains its outbox, writes heartbeats, and stops the
moment the client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import orjson
from starlette.types import Message, Receive, Scope, Send

from switchboard.api.deps import Services
from switchboard.api.handoff import handoff_of
from switchboard.api.responses import send_error
from switchboard.auth.authenticator import Principal
from switchboard.bus.stored import Stored
from switchboard.errors import invalid, not_found
from switchboard.events import (
    CATALOGUE,
    EVENTS_STREAM,
    TRANSCRIPTS_STREAM,
    call_events_subject,
    call_transcript_subject,
    conversation_events_subject,
    parse_events_subject,
    subject_mismatch,
    workspace_events_subject,
)
from switchboard.live.cursor import cursor_text
from switchboard.live.endpoint import (
    StreamEndpoint,
    hang_up_of_this_connection,
    protocol_of_this_connection,
    timed_send,
)
from switchboard.live.frames import (
    SSE_HEADERS,
    SSE_HEARTBEAT,
    Ending,
    Terminal,
    sse_gap,
    sse_reset,
    sse_retry,
)
from switchboard.live.history import stored_call
from switchboard.live.hub import View, encode, turn_frame
from switchboard.live.outbox import Frame, Outbox
from switchboard.live.resume import SendFrames, Start, locate, query_value, replay, requested_cursor
from switchboard.live.sse_connection import take_over

BATCH = 64  # frames joined into one write when a client has fallen behind
EVENT_TYPE_PREFIX = re.compile(r"[a-z_.]*")


async def _watch_disconnect(receive: Receive, outbox: Outbox) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            outbox.abort()
            return


async def pump_sse(
    services: Services,
    kind: str,
    principal: Principal,
    outbox: Outbox,
    scope: Scope,
    receive: Receive,
    send: Send,
    before_live: Callable[[Send], Awaitable[None]] | None = None,
) -> None:
    """Writes the response: headers, retry hint, what `before_live` sends (a reset, a replay),
    then frames, heartbeats, one terminal frame. The registry's ticker asks for heartbeats,
    ends expired tokens and cuts off a client that has stopped reading; this loop only
    writes."""
    metrics = services.metrics
    services.registry.add(
        outbox,
        kind,
        principal.key_id,
        expires_at=principal.expires_at,
        heartbeats=True,
        hang_up=hang_up_of_this_connection(scope),
    )
    handoff = handoff_of(scope)
    send = timed_send(send, outbox)
    protocol = protocol_of_this_connection(scope)
    listener: asyncio.Task[None] | None = None
    if protocol is not None:
        protocol.when_lost(outbox.abort)  # no task per stream waiting on `receive`
    else:
        listener = asyncio.create_task(_watch_disconnect(receive, outbox))
    try:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await send({"type": "http.response.body", "body": sse_retry(), "more_body": True})
        if before_live is not None:
            await before_live(send)
        if protocol is not None:
            if not outbox.aborted:
                # Live: the connection is ours from here, and this call returns (see
                # live/sse_connection.py); what it holds is released when the stream ends.
                take_over(
                    protocol,
                    outbox,
                    handoff,
                    kind=kind,
                    frames_sent=metrics.frames_sent,
                    heartbeats=metrics.heartbeats,
                )
            return
        # Under another server: a writer loop of our own, until the stream ends.
        while True:
            item = await outbox.next()
            if outbox.aborted:
                return
            if item is None:
                await send({"type": "http.response.body", "body": SSE_HEARTBEAT, "more_body": True})
                metrics.heartbeats[kind] += 1
                continue
            if isinstance(item, Terminal):
                await send({"type": "http.response.body", "body": item.sse(), "more_body": False})
                return
            batch = [item, *outbox.take_ready(BATCH - 1)]
            body = b"".join(f if isinstance(f, bytes) else f.encode() for f in batch)
            await send({"type": "http.response.body", "body": body, "more_body": True})
            metrics.frames_sent[kind] += len(batch)
    finally:
        handoff.release(partial(services.registry.remove, outbox))
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


def body_writer(send: Send) -> SendFrames:
    async def send_frames(frames: Sequence[Frame]) -> None:
        body = b"".join(f if isinstance(f, bytes) else f.encode() for f in frames)
        await send({"type": "http.response.body", "body": body, "more_body": True})

    return send_frames


class TranscriptStream(StreamEndpoint):
    """`GET /v1/calls/{id}/transcript/stream`: turns live; with a cursor, the final turns
    missed first; with `from=start`, every final turn and the turn in flight first."""

    kind = "transcript_sse"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = self.services
        principal: Principal = scope["state"]["principal"]
        call_id = await self.path_id(scope, send, "call_id", "call")
        if call_id is None:
            return
        origin = query_value(scope, "from")
        if origin not in (None, "start"):
            await send_error(scope, send, invalid("from", "must be 'start' when given"))
            return
        cursor = requested_cursor(scope)
        ws = principal.workspace_id
        outbox = self.new_outbox(gap=sse_gap)
        subject = call_transcript_subject(ws, call_id)
        watches = [
            (subject, View.TRANSCRIPT),
            (call_events_subject(ws, call_id), View.TRANSCRIPT_END),
        ]
        async with self.watching(scope, ws, watches, outbox):
            status = await self.call_statuses.get((ws, call_id))
            ended = status not in (None, "in_progress")
            if not ended:
                # The recorder may lag the bus: a call whose `call.initiated` is stored exists,
                # and one whose `call.completed` is stored has ended, whatever the row says yet
                # (EventSource reconnects right after `event: end`, before the row catches up).
                stored = await stored_call(services.bus.client, ws, call_id)
                if status is None and not stored.initiated:
                    await send_error(scope, send, not_found("call", call_id))
                    return
                ended = stored.completed
            if cursor is None and origin is None:
                if ended:
                    # 204 tells EventSource to stop reconnecting.
                    await send({"type": "http.response.start", "status": 204, "headers": []})
                    await send({"type": "http.response.body", "body": b""})
                    return
                await pump_sse(services, self.kind, principal, outbox, scope, receive, send)
                return
            # A cursor wins over from=start: EventSource keeps the URL and adds Last-Event-ID.
            if cursor is not None:
                start = await locate(
                    services.bus.client,
                    services.bus.js,
                    TRANSCRIPTS_STREAM,
                    cursor,
                    lambda stored_subject: stored_subject == subject,
                    self.history,
                )
            else:
                start = Start(0)
            self.resumes[self.kind] += 1

            async def before_live(send: Send) -> None:
                await self._catch_up(start, subject, outbox, send, in_flight=cursor is None)
                if ended:
                    outbox.end(Terminal(Ending.CALL_COMPLETED))

            await pump_sse(
                services, self.kind, principal, outbox, scope, receive, send, before_live
            )

    async def _catch_up(
        self, start: Start, subject: str, outbox: Outbox, send: Send, *, in_flight: bool
    ) -> None:
        """A reset, or the final turns after the start (partials of finished turns are not
        replayed); from the start, also the turn in flight: its latest partial."""
        if start.after is None:
            if start.reset is not None:
                self.resets[self.kind] += 1
                await body_writer(send)([sse_reset(start.reset)])
            return
        finished: set[str] = set()
        latest_partial: dict[str, Any] = {}

        def frames_of(stored: Stored) -> tuple[Sequence[Frame], str | None]:
            try:
                turn = orjson.loads(stored.data)
            except orjson.JSONDecodeError:
                return [], None
            if not isinstance(turn, dict):
                return [], None
            cursor = cursor_text(TRANSCRIPTS_STREAM, stored.seq)
            if turn.get("is_final") is not True:
                latest_partial["frame"] = turn_frame(turn, cursor)
                latest_partial["turn_id"] = turn.get("turn_id")
                return [], None
            finished.add(str(turn.get("turn_id")))
            frame = turn_frame(turn, cursor)
            return ([frame], cursor) if frame is not None else ([], None)

        sent = await replay(
            self.services.bus.client,
            TRANSCRIPTS_STREAM,
            subject,
            start.after,
            outbox,
            frames_of,
            body_writer(send),
        )
        partial = latest_partial.get("frame")
        if in_flight and partial is not None and latest_partial["turn_id"] not in finished:
            await body_writer(send)([partial])
            sent += 1
        self.replayed[self.kind] += sent


class ConversationStream(StreamEndpoint):
    """`GET /v1/conversations/{id}/stream` (Authorization header only; the middleware has
    already refused any ?token=); with a cursor, the envelopes missed first."""

    kind = "conversation_sse"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal: Principal = scope["state"]["principal"]
        conversation_id = await self.path_id(scope, send, "conversation_id", "conv")
        if conversation_id is None:
            return
        ws = principal.workspace_id
        outbox = self.new_outbox(gap=sse_gap)
        subject = conversation_events_subject(ws, conversation_id)
        async with self.watching(scope, ws, [(subject, View.CONVERSATION)], outbox):
            if not await self.conversations.get((ws, conversation_id)):
                await send_error(scope, send, not_found("conversation", conversation_id))
                return
            await self.envelopes(
                scope, receive, send, subject, outbox, lambda stored: stored == subject
            )

    async def envelopes(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        subject: str,
        outbox: Outbox,
        belongs: Callable[[str], bool],
    ) -> None:
        """The envelope stream on `subject`, first catching up from the client's cursor, if
        it sent one (`belongs` says which stored subjects a cursor may name)."""
        services = self.services
        cursor = requested_cursor(scope)
        before_live = None
        if cursor is not None:
            bus = services.bus
            start = await locate(bus.client, bus.js, EVENTS_STREAM, cursor, belongs, self.history)
            self.resumes[self.kind] += 1

            async def before_live(send: Send) -> None:
                await self.catch_up_envelopes(start, subject, outbox, send)

        principal: Principal = scope["state"]["principal"]
        await pump_sse(services, self.kind, principal, outbox, scope, receive, send, before_live)

    async def catch_up_envelopes(
        self, start: Start, subject: str, outbox: Outbox, send: Send
    ) -> None:
        """A reset, or the envelopes stored on `subject` (a wildcard for the workspace stream)
        after the start that the outbox's filter wants, each as its live frame."""
        if start.after is None:
            if start.reset is not None:
                self.resets[self.kind] += 1
                await body_writer(send)([sse_reset(start.reset)])
            return

        def frames_of(stored: Stored) -> tuple[Sequence[Frame], str | None]:
            try:
                envelope = orjson.loads(stored.data)
            except orjson.JSONDecodeError:
                return [], None
            # The same trust rule as live: the subject is the authority (SPEC 7).
            if not isinstance(envelope, dict) or subject_mismatch(stored.subject, envelope):
                return [], None
            if outbox.wants is not None and not outbox.wants(str(envelope.get("event_type"))):
                return [], None
            cursor = cursor_text(EVENTS_STREAM, stored.seq)
            frames = [
                f for f in encode(View.CONVERSATION, envelope, cursor) if isinstance(f, bytes)
            ]
            return frames, cursor

        sent = await replay(
            self.services.bus.client,
            EVENTS_STREAM,
            subject,
            start.after,
            outbox,
            frames_of,
            body_writer(send),
        )
        self.replayed[self.kind] += sent


def event_type_filter(raw: str | None) -> Callable[[str], bool] | None:
    """`?event_types=call.initiated,message.*` as a predicate (None: every event); a trailing
    `*` matches a prefix. Raises ValueError naming what is not an event type or a prefix."""
    if raw is None:
        return None
    exact: set[str] = set()
    prefixes: list[str] = []
    for part in (piece.strip() for piece in raw.split(",")):
        if part.endswith("*") and "*" not in part[:-1] and EVENT_TYPE_PREFIX.fullmatch(part[:-1]):
            prefixes.append(part[:-1])
        elif part in CATALOGUE:
            exact.add(part)
        else:
            raise ValueError(f"{part!r} is not an event type or a prefix such as message.*")
    if "" in prefixes:
        return None  # "*": everything
    if not exact and not prefixes:
        raise ValueError("name at least one event type")
    starts = tuple(prefixes)
    return lambda event_type: event_type in exact or event_type.startswith(starts)


class WorkspaceStream(ConversationStream):
    """`GET /v1/events/stream` (SPEC 5.5): every envelope of the key's workspace, filtered by
    `?event_types=`, with cursors and resume like the conversation stream. One subscription
    per replica per workspace watched (a wildcard subject), however many clients."""

    kind = "events_sse"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal: Principal = scope["state"]["principal"]
        try:
            wants = event_type_filter(query_value(scope, "event_types"))
        except ValueError as bad:
            await send_error(scope, send, invalid("event_types", str(bad)))
            return
        ws = principal.workspace_id
        outbox = self.new_outbox(gap=sse_gap, wants=wants)
        subject = workspace_events_subject(ws)
        async with self.watching(scope, ws, [(subject, View.CONVERSATION)], outbox):
            await self.envelopes(
                scope, receive, send, subject, outbox, lambda stored: in_workspace(stored, ws)
            )


def in_workspace(subject: str, workspace_id: str) -> bool:
    parsed = parse_events_subject(subject)
    return parsed is not None and parsed[0] == workspace_id
