"""The call event WebSocket (SPEC 5.3), as a raw ASGI endpoint. Auth happened before the
upgrade (the middleware answers a plain 401 instead); here: 404 before the upgrade for a call
that is not the caller's, then the call's history and live envelopes out, DTMF commands in
(rate-limited per socket), and the close codes of SPEC. A socket that sends `listen` also gets
the call's live audio as binary frames, after its events, until `unlisten` or the end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from starlette.types import Receive, Scope, Send

from switchboard.api.deps import Services
from switchboard.api.responses import send_error
from switchboard.auth.authenticator import Principal
from switchboard.bus.stored import stored_after
from switchboard.errors import not_found
from switchboard.events import (
    EVENTS_STREAM,
    call_audio_subject,
    call_control_subject,
    call_events_subject,
    subject_mismatch,
)
from switchboard.live.audio import AudioBuffer, AudioChunk
from switchboard.live.direct import WebSocketDirect
from switchboard.live.endpoint import (
    StreamEndpoint,
    hang_up_of_this_connection,
    protocol_of_this_connection,
    timed_send,
)
from switchboard.live.frames import (
    CommandError,
    Ending,
    Listen,
    SendDtmf,
    Terminal,
    Unlisten,
    command_result,
    parse_command,
    ws_gap,
    ws_reset,
)
from switchboard.live.history import stored_call
from switchboard.live.hub import View
from switchboard.live.outbox import Outbox
from switchboard.live.ratelimit import COMMAND_BURST, COMMANDS_PER_SECOND, TokenBucket
from switchboard.live.resume import CURSOR_UNKNOWN, query_value
from switchboard.outage import BusUnavailable

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 5.0  # seconds the media plane has to answer a command
MAX_COMMANDS_IN_FLIGHT = 8
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
            status = await services.database.call_status(ws, call_id)
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
            send = timed_send(send, outbox)
            try:
                replayed, completed = await self._replay(principal, call_id, outbox, send, cursor)
                if completed:
                    await send({"type": "websocket.close", "code": 1000, "reason": "call ended"})
                    return
                if status not in (None, "in_progress"):
                    # The row says ended, the bus does not have `call.completed` yet: an API
                    # hang-up whose event the outbox relay is about to publish. It arrives live
                    # (the socket is subscribed); close after it, or after a bound if it does not.
                    loop = asyncio.get_running_loop()
                    loop.call_later(ENDED_GRACE, outbox.end, Terminal(Ending.CALL_COMPLETED))
                protocol = protocol_of_this_connection(scope)
                await self._session(principal, call_id, outbox, receive, send, replayed, protocol)
            except OSError:  # the client went away mid-replay (uvicorn's ClientDisconnected)
                return
            finally:
                services.registry.remove(outbox)

    async def _replay(
        self, principal: Principal, call_id: str, outbox: Outbox, send: Send, cursor: str | None
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
                await send({"type": "websocket.send", "text": orjson.dumps(envelope).decode()})
                replayed.add(event_id)
                outbox.last_cursor = event_id
                sent += 1
        except BusUnavailable as failure:  # the bus is slow or down: carry on with live events
            log.warning("%s", failure)
        if not found:
            self.resets[self.kind] += 1
            await send({"type": "websocket.send", "text": ws_reset(CURSOR_UNKNOWN)})
        outbox.skip_through = last
        self.services.metrics.frames_sent[self.kind] += sent
        if cursor is not None:
            self.replayed[self.kind] += sent
        return replayed, completed

    async def _session(
        self,
        principal: Principal,
        call_id: str,
        outbox: Outbox,
        receive: Receive,
        send: Send,
        replayed: set[str],
        protocol: Any | None,
    ) -> None:
        # request_id -> set once its command.result is queued; the writer holds back this
        # sender's copy of the matching call.dtmf_sent until then, so the sender always sees
        # its result first (the two travel on different NATS subscriptions).
        answered: dict[str, asyncio.Event] = {}
        writer = asyncio.create_task(self._write(outbox, send, answered, replayed))
        if protocol is not None:
            # Frames skip the writer unless it must see them: a DTMF result to order, the
            # live copies of a replay to skip.
            direct = WebSocketDirect(
                protocol,
                self.services.metrics.frames_sent,
                self.kind,
                lambda: bool(answered) or bool(replayed),
                self.audio_bytes,
            )
            outbox.direct = direct
            outbox.direct_audio = direct.audio
        # However the writer ends (its close sent, the client gone), the reader stops waiting.
        writer.add_done_callback(lambda _: outbox.abort())
        commands: set[asyncio.Task[None]] = set()
        clock = asyncio.get_running_loop().time
        bucket = TokenBucket(COMMANDS_PER_SECOND, COMMAND_BURST, clock())
        # Built from the principal and the path, never from what the client sends (SPEC 7).
        audio_subject = call_audio_subject(principal.workspace_id, call_id)
        listening = False
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
                command = parse_command(message.get("text") or "")
                if not bucket.take(clock()):
                    self.refused["rate"] += 1
                    outbox.push_priority(
                        command_result(
                            command.request_id,
                            False,
                            "RATE_LIMITED",
                            f"At most {COMMANDS_PER_SECOND:g} commands a second "
                            f"(bursts of {COMMAND_BURST}); this one was not sent.",
                        )
                    )
                elif isinstance(command, CommandError):
                    outbox.push_priority(
                        command_result(
                            command.request_id, False, command.error_code, command.message
                        )
                    )
                elif isinstance(command, Listen):
                    listening = await self._listen(principal, audio_subject, command, outbox)
                elif isinstance(command, Unlisten):
                    # Forget the audio queued first: no binary frame follows the result.
                    outbox.unlisten()
                    outbox.push_priority(command_result(command.request_id, True))
                    if listening:
                        listening = False
                        await self.services.hub.unwatch(audio_subject, View.AUDIO, outbox)
                elif len(commands) >= MAX_COMMANDS_IN_FLIGHT:
                    self.refused["in_flight"] += 1
                    outbox.push_priority(
                        command_result(
                            command.request_id,
                            False,
                            "RATE_LIMITED",
                            f"At most {MAX_COMMANDS_IN_FLIGHT} commands may be in flight.",
                        )
                    )
                else:
                    answered[command.request_id] = asyncio.Event()
                    task = asyncio.create_task(
                        self._send_dtmf(principal, call_id, command, outbox, answered)
                    )
                    commands.add(task)
                    task.add_done_callback(commands.discard)
        finally:
            outbox.abort()
            for task in (writer, *commands):
                task.cancel()
            for task in (writer, *commands):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if listening:
                await self.services.hub.unwatch(audio_subject, View.AUDIO, outbox)

    async def _listen(
        self, principal: Principal, audio_subject: str, command: Listen, outbox: Outbox
    ) -> bool:
        """Subscribes the socket to the call's audio (the replica's one subscription per call,
        made by the first listener), answers, then lets chunks in: so the result comes before
        the first binary frame. Returns whether the socket now listens."""
        services = self.services
        if outbox.audio is None:
            try:
                if not services.bus.connected:
                    raise BusUnavailable("the bus is not connected")
                await services.hub.watch(audio_subject, principal.workspace_id, View.AUDIO, outbox)
            except Exception as failure:  # the bus is down or slow: the socket lives on
                log.warning("could not listen to a call's audio: %s", failure)
                outbox.push_priority(
                    command_result(
                        command.request_id,
                        False,
                        "UNAVAILABLE",
                        "The call's audio is unavailable right now; try again.",
                    )
                )
                return False
        outbox.push_priority(command_result(command.request_id, True))
        outbox.listen(AudioBuffer(on_drop=self._audio_dropped))
        self.listens[self.kind] += 1
        return True

    def _audio_dropped(self) -> None:
        self.audio_dropped[self.kind] += 1

    async def _write(
        self,
        outbox: Outbox,
        send: Send,
        answered: dict[str, asyncio.Event],
        replayed: set[str],
    ) -> None:
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
            if replayed and text.startswith('{"event_id"'):
                # Live copies of replayed events arrive first; once a new one comes, stop looking.
                if orjson.loads(text).get("event_id") in replayed:
                    continue
                replayed.clear()
            if answered and '"call.dtmf_sent"' in text:
                request_id = orjson.loads(text).get("payload", {}).get("request_id")
                if request_id in answered:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(COMMAND_TIMEOUT):
                            await answered[request_id].wait()
                    for result in outbox.take_priority():
                        await send({"type": "websocket.send", "text": str(result)})
            await send({"type": "websocket.send", "text": text})
            metrics.frames_sent[self.kind] += 1

    async def _send_dtmf(
        self,
        principal: Principal,
        call_id: str,
        command: SendDtmf,
        outbox: Outbox,
        answered: dict[str, asyncio.Event],
    ) -> None:
        """Asks the media plane on the call's control subject; it answers, then publishes
        `call.dtmf_sent` for everyone. No answer in time is an UNAVAILABLE result, never a hang."""
        request = orjson.dumps(
            {
                "action": "send_dtmf",
                "digits": command.digits,
                "request_id": command.request_id,
                "call_id": call_id,
            }
        )
        subject = call_control_subject(principal.workspace_id, call_id)
        try:
            reply = await self.services.bus.client.request(
                subject, request, timeout=COMMAND_TIMEOUT
            )
            answer = orjson.loads(reply.data)
            if not isinstance(answer, dict):
                raise ValueError("the media plane's answer is not an object")
        except NoRespondersError:
            result = command_result(
                command.request_id, False, "UNAVAILABLE", "No media plane is handling this call."
            )
        except (TimeoutError, NatsTimeout):
            result = command_result(
                command.request_id, False, "UNAVAILABLE", "The media plane did not answer in time."
            )
        except (ValueError, orjson.JSONDecodeError):
            log.warning("the media plane answered a command with something unreadable")
            result = command_result(
                command.request_id, False, "INTERNAL", "The media plane's answer was unreadable."
            )
        else:
            if answer.get("ok") is True:
                result = command_result(command.request_id, True)
            else:
                result = command_result(
                    command.request_id,
                    False,
                    str(answer.get("error_code") or "UNAVAILABLE"),
                    str(answer.get("message") or "The media plane refused the command."),
                )
        outbox.push_priority(result)
        done = answered.pop(command.request_id, None)
        if done is not None:
            done.set()
