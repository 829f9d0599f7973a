"""The commands of one call WebSocket (SPEC 5.3): DTMF, listen and unlisten, rate-limited per
socket, and the two rules its outgoing events follow (a sender sees its own command's result
before the `call.dtmf_sent` it caused; the live copies of replayed events are skipped). Kept
apart from how frames are read and written, so the socket's own connection
(live/ws_connection.py) and the ASGI path under another server share it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from switchboard.api.deps import Services
from switchboard.auth.authenticator import Principal
from switchboard.events import call_audio_subject, call_control_subject
from switchboard.live.audio import AudioBuffer
from switchboard.live.frames import (
    CommandError,
    Listen,
    SendDtmf,
    Unlisten,
    command_result,
    parse_command,
)
from switchboard.live.hub import View
from switchboard.live.outbox import Outbox
from switchboard.live.ratelimit import COMMAND_BURST, COMMANDS_PER_SECOND, TokenBucket
from switchboard.outage import BusUnavailable

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 5.0  # seconds the media plane has to answer a command
MAX_COMMANDS_IN_FLIGHT = 8

SEND, SKIP, HOLD = "send", "skip", "hold"


class CommandSession:
    def __init__(
        self,
        services: Services,
        principal: Principal,
        call_id: str,
        outbox: Outbox,
        replayed: set[str],
        *,
        refused: dict[str, int],
        listens: dict[str, int],
        kind: str,
        on_audio_drop: Callable[[], None],
    ) -> None:
        self.services = services
        self.principal = principal
        self.call_id = call_id
        self.outbox = outbox
        # Event ids a replay sent: their live copies are skipped until a new event comes.
        self.replayed = replayed
        # request_id -> set once its command.result is queued; the writer holds back this
        # sender's copy of the matching call.dtmf_sent until then (the two travel on different
        # NATS subscriptions).
        self.answered: dict[str, asyncio.Event] = {}
        self.commands: set[asyncio.Task[None]] = set()
        self.clock = asyncio.get_running_loop().time
        self.bucket = TokenBucket(COMMANDS_PER_SECOND, COMMAND_BURST, self.clock())
        # Built from the principal and the path, never from what the client sends (SPEC 7).
        self.audio_subject = call_audio_subject(principal.workspace_id, call_id)
        self.listening = False
        self.refused = refused
        self.listens = listens
        self.kind = kind
        self.on_audio_drop = on_audio_drop

    def held(self) -> bool:
        """Whether the writer must see every event itself (a DTMF result to order, the live
        copies of a replay to skip): no direct writes meanwhile."""
        return bool(self.answered) or bool(self.replayed)

    def before_send(self, text: str) -> tuple[str, str | None]:
        """What to do with an outgoing event: SEND it, SKIP it (a replay sent it), or HOLD it
        until the command with the returned request id has its result queued (or times out)."""
        if self.replayed and text.startswith('{"event_id"'):
            # Live copies of replayed events arrive first; once a new one comes, stop looking.
            if orjson.loads(text).get("event_id") in self.replayed:
                return SKIP, None
            self.replayed.clear()
        if self.answered and '"call.dtmf_sent"' in text:
            request_id = orjson.loads(text).get("payload", {}).get("request_id")
            if request_id in self.answered:
                return HOLD, request_id
        return SEND, None

    def handle(self, text: str) -> Coroutine[Any, Any, None] | None:
        """Acts on one command; returns what must finish before the next command is read
        (listening and unlistening change what the socket receives, in order)."""
        outbox = self.outbox
        command = parse_command(text)
        if not self.bucket.take(self.clock()):
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
                command_result(command.request_id, False, command.error_code, command.message)
            )
        elif isinstance(command, Listen):
            return self._listen(command)
        elif isinstance(command, Unlisten):
            return self._unlisten(command)
        elif len(self.commands) >= MAX_COMMANDS_IN_FLIGHT:
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
            self.answered[command.request_id] = asyncio.Event()
            task = asyncio.create_task(self._send_dtmf(command))
            self.commands.add(task)
            task.add_done_callback(self.commands.discard)
        return None

    async def close(self) -> None:
        """The socket ended: commands in flight are dropped, the audio watch released."""
        commands = list(self.commands)
        for task in commands:
            task.cancel()
        for task in commands:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.listening:
            self.listening = False
            await self.services.hub.unwatch(self.audio_subject, View.AUDIO, self.outbox)

    async def _unlisten(self, command: Unlisten) -> None:
        # Forget the audio queued first: no binary frame follows the result.
        self.outbox.unlisten()
        self.outbox.push_priority(command_result(command.request_id, True))
        if self.listening:
            self.listening = False
            await self.services.hub.unwatch(self.audio_subject, View.AUDIO, self.outbox)

    async def _listen(self, command: Listen) -> None:
        """Subscribes the socket to the call's audio (the replica's one subscription per call,
        made by the first listener), answers, then lets chunks in: so the result comes before
        the first binary frame."""
        services = self.services
        outbox = self.outbox
        if outbox.audio is None:
            try:
                if not services.bus.connected:
                    raise BusUnavailable("the bus is not connected")
                await services.hub.watch(
                    self.audio_subject, self.principal.workspace_id, View.AUDIO, outbox
                )
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
                return
        outbox.push_priority(command_result(command.request_id, True))
        outbox.listen(AudioBuffer(on_drop=self.on_audio_drop))
        self.listens[self.kind] += 1
        self.listening = True

    async def _send_dtmf(self, command: SendDtmf) -> None:
        """Asks the media plane on the call's control subject; it answers, then publishes
        `call.dtmf_sent` for everyone. No answer in time is an UNAVAILABLE result, never a hang."""
        request = orjson.dumps(
            {
                "action": "send_dtmf",
                "digits": command.digits,
                "request_id": command.request_id,
                "call_id": self.call_id,
            }
        )
        subject = call_control_subject(self.principal.workspace_id, self.call_id)
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
        self.outbox.push_priority(result)
        done = self.answered.pop(command.request_id, None)
        if done is not None:
            done.set()
