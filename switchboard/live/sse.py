"""The two SSE streams (SPEC 5.1 and 5.2), as raw ASGI endpoints: subscribe first, then read
state, then one writer loop per client that drains its outbox, writes heartbeats, and stops the
moment the client disconnects."""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import Message, Receive, Scope, Send

from switchboard.api.deps import Services
from switchboard.api.responses import send_error
from switchboard.auth.authenticator import Principal
from switchboard.errors import not_found
from switchboard.events import (
    call_events_subject,
    call_transcript_subject,
    conversation_events_subject,
)
from switchboard.live.endpoint import StreamEndpoint, hang_up_of_this_connection, timed_send
from switchboard.live.frames import SSE_HEADERS, SSE_HEARTBEAT, Terminal, sse_retry
from switchboard.live.history import stored_call
from switchboard.live.hub import View
from switchboard.live.outbox import Outbox

BATCH = 64  # frames joined into one write when a client has fallen behind


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
) -> None:
    """Writes the response: headers, retry hint, frames, heartbeats, one terminal frame. The
    registry's ticker asks for heartbeats, ends expired tokens and cuts off a client that has
    stopped reading; this loop only writes."""
    metrics = services.metrics
    services.registry.add(
        outbox,
        kind,
        principal.key_id,
        expires_at=principal.expires_at,
        heartbeats=True,
        hang_up=hang_up_of_this_connection(scope),
    )
    send = timed_send(send, outbox)
    listener = asyncio.create_task(_watch_disconnect(receive, outbox))
    try:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await send({"type": "http.response.body", "body": sse_retry(), "more_body": True})
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
        services.registry.remove(outbox)
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener


class TranscriptStream(StreamEndpoint):
    """`GET /v1/calls/{id}/transcript/stream`."""

    kind = "transcript_sse"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = self.services
        principal: Principal = scope["state"]["principal"]
        call_id = await self.path_id(scope, send, "call_id", "call")
        if call_id is None:
            return
        ws = principal.workspace_id
        outbox = self.new_outbox()
        watches = [
            (call_transcript_subject(ws, call_id), View.TRANSCRIPT),
            (call_events_subject(ws, call_id), View.TRANSCRIPT_END),
        ]
        async with self.watching(ws, watches, outbox):
            status = await services.database.call_status(ws, call_id)
            ended = status not in (None, "in_progress")
            if not ended:
                # The recorder may lag the bus: a call whose `call.initiated` is stored exists,
                # and one whose `call.completed` is stored has ended, whatever the row says yet
                # (EventSource reconnects right after `event: end`, before the row catches up).
                stored = await stored_call(services.bus.js, ws, call_id)
                if status is None and not stored.initiated:
                    await send_error(scope, send, not_found("call", call_id))
                    return
                ended = stored.completed
            if ended:
                # 204 tells EventSource to stop reconnecting.
                await send({"type": "http.response.start", "status": 204, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            await pump_sse(services, self.kind, principal, outbox, scope, receive, send)


class ConversationStream(StreamEndpoint):
    """`GET /v1/conversations/{id}/stream` (Authorization header only; the middleware has
    already refused any ?token=)."""

    kind = "conversation_sse"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = self.services
        principal: Principal = scope["state"]["principal"]
        conversation_id = await self.path_id(scope, send, "conversation_id", "conv")
        if conversation_id is None:
            return
        ws = principal.workspace_id
        outbox = self.new_outbox()
        subject = conversation_events_subject(ws, conversation_id)
        async with self.watching(ws, [(subject, View.CONVERSATION)], outbox):
            if not await services.database.conversation_exists(ws, conversation_id):
                await send_error(scope, send, not_found("conversation", conversation_id))
                return
            await pump_sse(services, self.kind, principal, outbox, scope, receive, send)
