"""The call event WebSocket (SPEC 5.3), as a raw ASGI endpoint. Auth happened before the
upgrade (the middleware answers a plain 401 instead); here: 404 before the upgrade for a call
that is not the caller's, then the call's history and live envelopes out, DTMF commands in
(rate-limited per socket), and the close codes of SPEC. A socket that sends `listen` also gets
the call's live audio as binary frames, after its events, until `unlisten` or the end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from functools import partial

import orjson
from starlette.types import Receive, Scope, Send

from switchboard.api.deps import Services
from switchboard.api.handoff import handoff_of
from switchboard.api.responses import send_error
from switchboard.auth.authenticator import Principal
from switchboard.bus.stored import stored_after
from switchboard.errors import not_found
from switchboard.events import EVENTS_STREAM, call_events_subject, subject_mismatch
from switchboard.live.audio import AudioChunk
from switchboard.live.endpoint import (
    StreamEndpoint,
    hang_up_of_this_connection,
    protocol_of_this_connection,
    timed_send,
)
from switchboard.live.frames import Ending, Terminal, ws_gap, ws_reset
from switchboard.live.history import stored_call
from switchboard.live.hub import View
from switchboard.live.outbox import Outbox
from switchboard.live.resume import CURSOR_UNKNOWN, query_value
from switchboard.live.ws_connection import take_over
from switchboard.live.ws_session import COMMAND_TIMEOUT, HOLD, SKIP, CommandSession
from switchboard.outage import BusUnavailable

log = logging.getLogger(__name__)

ENDED_GRACE = 5.0  # seconds a socket to an ended call waits for its call.completed to be relayed


class CallEventSocket(StreamEndpoint):
    """`GET /v1/calls/{id}/stream` (WebSocket)."""

    kind = "call_websocket"

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self.refused = services.metrics.counter(
            "switchboard_commands_refused_total",
            "WebSocket commands answered RATE_LIMITED, by the limit they hit.",
            "limit",
        )
        self.audio_bytes = services.metrics.counter(
            "switchboard_audio_bytes_sent_total",
            "Bytes of live call audio written to listening WebSockets.",
            "kind",
        )
        self.audio_dropped = services.metrics.counter(
            "switchboard_audio_chunks_dropped_total",
            "20 ms audio chunks a listener lost because it was more than a second behind.",
            "kind",
        )
        self.listens = services.metrics.counter(
            "switchboard_listens_total", "listen commands answered ok.", "kind"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = self.services
        principal: Principal = scope["state"]["principal"]
        call_id = await self.path_id(scope, send, "call_id", "call")
        if call_id is None:
            return
        connect = await receive()
        if connect["type"] != "websocket.connect":
            return
        ws = principal.workspace_id
        outbox = self.new_outbox(gap=ws_gap)
        cursor = query_value(scope, "last_event_id")
        async with self.watching(
            scope, ws, [(call_events_subject(ws, call_id), View.CALL_EVENTS)], outbox
        ):
            status = await self.call_statuses.get((ws, call_id))
            # A call the recorder has not written yet exists if the bus holds its start.
            if (
                status is None
                and not (await stored_call(services.bus.client, ws, call_id)).initiated
            ):
                await send_error(scope, send, not_found("call", call_id))
                return
            await send({"type": "websocket.accept"})
            # Registered before the replay: a client that reads nothing may stall it too.
            services.registry.add(
                outbox,
                self.kind,
                principal.key_id,
                expires_at=principal.expires_at,
                hang_up=hang_up_of_this_connection(scope),
            )
            handoff = handoff_of(scope)
            protocol = protocol_of_this_connection(scope)
            # The socket is ours from here (live/ws_connection.py): this call returns once the
            # replay is written, and what it holds is released when the socket ends.
            connection = None
            if protocol is not None:
                connection = take_over(
                    protocol,
                    outbox,
                    handoff,
                    kind=self.kind,
                    ping_interval=services.settings.heartbeat_interval,
                    frames_sent=services.metrics.frames_sent,
                    audio_bytes=self.audio_bytes,
                )
            send = timed_send(send, outbox)

            async def send_text(text: str) -> None:
                await send({"type": "websocket.send", "text": text})

            try:
                replayed, completed = await self._replay(
                    principal,
                    call_id,
                    outbox,
                    send_text if connection is None else connection.send_text,
                    cursor,
                )
                if completed:
                    if connection is not None:
                        connection.close(1000, "call ended")
                    else:
                        await send(
                            {"type": "websocket.close", "code": 1000, "reason": "call ended"}
                        )
                    return
                if status not in (None, "in_progress"):
                    # The row says ended, the bus does not have `call.completed` yet: an API
                    # hang-up whose event the outbox relay is about to publish. It arrives live
                    # (the socket is subscribed); close after it, or after a bound if it does not.
                    loop = asyncio.get_running_loop()
                    loop.call_later(ENDED_GRACE, outbox.end, Terminal(Ending.CALL_COMPLETED))
                session = CommandSession(
                    services,
                    principal,
                    call_id,
                    outbox,
                    replayed,
                    refused=self.refused,
                    listens=self.listens,
                    kind=self.kind,
                    on_audio_drop=self._audio_dropped,
                )
                if connection is not None:
                    connection.start(session)
                    return
                await self._session(session, receive, send)
            except OSError:  # the client went away mid-replay (uvicorn's ClientDisconnected)
                return
            except Exception:
                if connection is not None:
                    connection.close(1011, "internal error")
                raise
            finally:
                handoff.release(partial(services.registry.remove, outbox))

    async def _replay(
        self,
        principal: Principal,
        call_id: str,
        outbox: Outbox,
        send_text: Callable[[str], Awaitable[None]],
        cursor: str | None,
    ) -> tuple[set[str], bool]:
        """Sends the call's stored events, from JetStream: all of them, or those after the
        envelope whose event_id is `cursor` (SPEC 5.3), or, for a cursor the call never had, a
        `stream.reset` and none. A client that connects mid-call (or after `call.initiated`,
        which is always before the call can be found) still sees every event from the first.
        Returns the replayed event ids (live copies of them are skipped) and whether the call's
        completion was among them."""
        replayed: set[str] = set()
        completed = False
        found = cursor is None
        sent = 0
        subject = call_events_subject(principal.workspace_id, call_id)
        last = 0
        if cursor is not None:
            self.resumes[self.kind] += 1
        try:
            async for stored in stored_after(self.services.bus.client, EVENTS_STREAM, subject, 0):
                last = stored.seq
                try:
                    envelope = orjson.loads(stored.data)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(envelope, dict) or subject_mismatch(subject, envelope):
                    continue
                event_id = str(envelope.get("event_id"))
                completed = completed or envelope.get("event_type") == "call.completed"
                if not found:
                    found = event_id == cursor
                    replayed.add(event_id)  # the client has it: its live copy is skipped too
                    continue
                await send_text(orjson.dumps(envelope).decode())
                replayed.add(event_id)
                outbox.last_cursor = event_id
                sent += 1
        except BusUnavailable as failure:  # the bus is slow or down: carry on with live events
            log.warning("%s", failure)
        if not found:
            self.resets[self.kind] += 1
            await send_text(ws_reset(CURSOR_UNKNOWN))
        outbox.skip_through = last
        self.services.metrics.frames_sent[self.kind] += sent
        if cursor is not None:
            self.replayed[self.kind] += sent
        return replayed, completed

    async def _session(self, session: CommandSession, receive: Receive, send: Send) -> None:
        """Under another server: a writer task and this reader loop, until the socket ends."""
        outbox = session.outbox
        writer = asyncio.create_task(self._write(session, send))
        # However the writer ends (its close sent, the client gone), the reader stops waiting.
        writer.add_done_callback(lambda _: outbox.abort())
        try:
            while True:
                # Replies owed to a client that does not read them are bounded: its next
                # command stays unread (TCP holds the client back) until they are sent.
                await outbox.reply_room()
                if outbox.aborted:
                    return
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is not None:
                    outbox.end_now(Terminal(Ending.BINARY_FRAME))
                    continue
                pending = session.handle(message.get("text") or "")
                if pending is not None:
                    await pending
        finally:
            outbox.abort()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            await session.close()

    def _audio_dropped(self) -> None:
        self.audio_dropped[self.kind] += 1

    async def _write(self, session: CommandSession, send: Send) -> None:
        outbox = session.outbox
        metrics = self.services.metrics
        audio_bytes = self.audio_bytes
        while True:
            # Audio only when no event, reply or terminal waits (`Outbox.next`).
            item = await outbox.next(audio=True)
            if outbox.aborted:
                return
            if item is None:
                continue
            if isinstance(item, AudioChunk):
                await send({"type": "websocket.send", "bytes": item.pcm})
                audio_bytes[self.kind] += len(item.pcm)
                continue
            if isinstance(item, Terminal):
                code, reason = item.websocket_close()
                await send({"type": "websocket.close", "code": code, "reason": reason})
                return
            text = item if isinstance(item, str) else item.decode()
            verdict, request_id = session.before_send(text)
            if verdict == SKIP:
                continue
            if verdict == HOLD and request_id is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(COMMAND_TIMEOUT):
                        await session.answered[request_id].wait()
                for result in outbox.take_priority():
                    await send({"type": "websocket.send", "text": str(result)})
            await send({"type": "websocket.send", "text": text})
            metrics.frames_sent[self.kind] += 1
