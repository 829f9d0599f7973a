"""Plays scripts on the bus, and plays the media plane for one workspace: it runs calls placed
with `POST /v1/calls`, answers DTMF commands (then emits `call.dtmf_sent`), and drops a call
the API hung up (the API itself publishes that call's `call.completed`). A call has sound: its
turns spoken by a speech engine, mixed, and published in real time on its `.audio` subject.

Every call it begins, it ends: a stop ends the calls on the air as `failed`, ended by the
`system`, and a start first ends those a killed predecessor left behind (see `ledger`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from switchboard.ids import new_id
from switchboard.live.history import stored_call
from switchboard.producer import Producer
from switchboard.simulate.audio import Mixer, chunk_time, due_chunks
from switchboard.simulate.ledger import CallLedger
from switchboard.simulate.script import Step, call_script, conversation_script, spoken_turns
from switchboard.simulate.speech import ENGINE, Speech

log = logging.getLogger(__name__)

TRANSPORTS = ("esl", "sip", "webrtc")
# Seconds a stop waits for its calls to store their end (a publish waits at most 5 s for its
# acknowledgement); a call still unended after that is ended by the next start.
STOP_GRACE = 6.0


class CallScript(Protocol):
    """What a call does after its `call.initiated` (`script.call_script` unless a test says)."""

    def __call__(self, rng: random.Random, *, transport: str) -> list[Step]: ...


@dataclass(frozen=True)
class SimulationPlan:
    workspace_id: str
    calls: int = 3
    conversations: int = 2
    seed: int | None = None
    pace: float = 1.0  # multiplies every delay: 0.01 plays a call in a fraction of a second
    forever: bool = False  # keep a steady trickle going (serve --demo)
    transports: tuple[str, ...] = TRANSPORTS

    @classmethod
    def demo(cls, workspace_id: str) -> SimulationPlan:
        return cls(workspace_id, calls=2, conversations=1, forever=True)


@dataclass(eq=False)
class LiveCall:
    """A call on the air. `interrupt` cuts its script short at the next step: for a hang-up
    from the API (the API stores the end) or for the simulator's stop (the call ends itself)."""

    call_id: str
    transport: str
    started: float = field(default_factory=time.time)
    interrupt: asyncio.Event = field(default_factory=asyncio.Event)
    hung_up: bool = False
    completing: bool = False  # its own `call.completed` is on its way
    task: asyncio.Task[None] | None = None

    async def pause(self, seconds: float) -> bool:
        """Waits `seconds`; True if the call was interrupted meanwhile (or before)."""
        if not self.interrupt.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, seconds)):
                    await self.interrupt.wait()
        return self.interrupt.is_set()

    def hang_up(self) -> None:
        self.hung_up = True
        self.interrupt.set()


class CallAudio:
    """A call's sound on the bus, from its first step to its end: one 20 ms chunk every 20 ms by
    the loop's clock (chunk k at start + k * 20 ms, so a late wake-up catches up instead of
    drifting), silence whenever nobody speaks, so a listener hears a continuous stream. Audio
    is lossy by nature: a chunk the bus refuses is dropped (said once) and the next goes on."""

    def __init__(self, call_id: str, publish: Callable[[bytes], Awaitable[None]]) -> None:
        self.call_id = call_id
        self.mixer = Mixer()
        self._publish = publish
        self._clock: asyncio.Task[None] | None = None
        self._rendering: dict[str, asyncio.Task[None]] = {}
        self._failure_told = False

    def start(self) -> None:
        self._clock = asyncio.create_task(self._run())

    def say(self, key: str, speech: Awaitable[array[int] | None]) -> None:
        """Plays the samples `speech` gives, from the chunk after they are ready."""

        async def when_ready() -> None:
            samples = await speech
            if samples is not None:
                self.mixer.add(key, samples)

        self._rendering[key] = asyncio.create_task(when_ready())

    def cut(self, key: str) -> None:
        """Stops a voice mid-way (a barge-in), or before it began."""
        rendering = self._rendering.pop(key, None)
        if rendering is not None:
            rendering.cancel()
        self.mixer.cut(key)

    async def stop(self) -> None:
        tasks = [*self._rendering.values(), *([self._clock] if self._clock else [])]
        self._rendering.clear()
        self._clock = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        start, sent = loop.time(), 0
        while True:
            skip, send = due_chunks(start, sent, loop.time())
            for _ in range(skip):
                self.mixer.next_chunk()
            for _ in range(send):
                chunk = self.mixer.next_chunk()
                try:
                    await self._publish(chunk)
                except Exception as failure:
                    if not self._failure_told:
                        self._failure_told = True
                        log.warning(
                            "audio of call %s: chunks dropped (%s)",
                            self.call_id,
                            type(failure).__name__,
                        )
            sent += skip + send
            await asyncio.sleep(max(0.0, chunk_time(start, sent) - loop.time()))


class Simulator:
    """`speech` says the turns (espeak-ng on the PATH unless given); `script` makes each call's
    steps. Sound needs both a speech engine and a real-time pace (pace >= 1): a call played
    faster than it would be spoken has none."""

    def __init__(
        self,
        client: Client,
        plan: SimulationPlan,
        *,
        speech: Speech | None = None,
        script: CallScript = call_script,
    ) -> None:
        self.client = client
        self.plan = plan
        self.speech = speech if speech is not None else Speech()
        self.script = script
        self.speaking = False  # whether calls have sound; decided by start()
        self.producer = Producer(client)
        self.rng = random.Random(plan.seed)
        self.live_calls: dict[str, LiveCall] = {}
        self.finished_calls: list[str] = []  # played to the end of their script
        self.ended_calls: list[str] = []  # ended as failed by a stop or a start
        self._ledger: CallLedger | None = None
        self._plan_task: asyncio.Task[None] | None = None
        self._subscriptions: list[Subscription] = []
        self._stopping = False
        self._number = 0

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        ws = self.plan.workspace_id
        if self.plan.pace < 1.0:
            log.info("simulated calls play no audio: the pace is faster than real time")
        elif not self.speech.available:
            log.warning("%s is not installed: simulated calls play no audio", ENGINE)
        else:
            self.speaking = True
        self._ledger = await CallLedger.open(self.client.jetstream(), ws)
        await self._end_left_behind()
        self._subscriptions.append(
            await self.client.subscribe(f"vb.{ws}.call.*.control", cb=self._on_control)
        )
        self._subscriptions.append(
            await self.client.subscribe(f"vb.{ws}.call.*.events", cb=self._on_call_event)
        )
        # nats-py writes a flush's PING ahead of commands its writer has yet to send: let it
        # send the SUBs first, so the PONG proves the server has them (see live/hub.py).
        await asyncio.sleep(0)
        await self.client.flush()
        self._plan_task = asyncio.create_task(self._run_plan())

    async def wait(self) -> None:
        """Until the plan's calls and conversations have all played (not for `forever`), and
        the calls placed through the API meanwhile have too."""
        if self._plan_task is not None:
            await self._plan_task
        await self._until_done([c.task for c in self.live_calls.values() if c.task])

    async def stop(self) -> None:
        """Stops playing: no new call or conversation begins, and every call on the air ends
        with a stored `call.completed` (`failed`, ended by the `system`) before this returns."""
        self._stopping = True
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        if self._plan_task is not None:
            self._plan_task.cancel()  # conversations stop; calls are tasks of their own
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._plan_task
        calls = [c for c in self.live_calls.values() if c.task is not None]
        for call in calls:
            call.interrupt.set()
        if calls:
            _, late = await asyncio.wait([c.task for c in calls if c.task], timeout=STOP_GRACE)
            for task in late:  # the bus is not answering: the next start ends these calls
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self.speech.stop()

    async def _end_left_behind(self) -> None:
        """Ends the calls on record for this workspace that no simulator is playing now: a
        predecessor was killed before it could end them. The bus says which of them began and
        which have already ended (the record may be a step behind it)."""
        assert self._ledger is not None
        for call_id, started in (await self._ledger.calls()).items():
            try:
                stored = await stored_call(self.client, self.plan.workspace_id, call_id)
                if stored.initiated and not stored.completed:
                    await self._end_failed(call_id, started)
                await self._ledger.remove(call_id)
            except Exception as failure:  # kept on record: the next start tries again
                log.warning("could not end left-behind call %s: %s", call_id, failure)

    async def _end_failed(self, call_id: str, started: float) -> None:
        await self.producer.event(
            "call.completed",
            workspace_id=self.plan.workspace_id,
            call_id=call_id,
            payload={
                "status": "failed",
                "duration_seconds": round(max(0.0, time.time() - started), 3),
                "ended_by": "system",
            },
        )
        self.ended_calls.append(call_id)

    # --- the plan ----------------------------------------------------------------------------

    async def _run_plan(self) -> None:
        while True:
            calls = [
                self._launch(self._new_call_id(), inbound=True) for _ in range(self.plan.calls)
            ]
            await asyncio.gather(
                self._until_done(calls),
                *(self._conversation() for _ in range(self.plan.conversations)),
            )
            if not self.plan.forever:
                return
            await asyncio.sleep(self.rng.uniform(2.0, 6.0) * self.plan.pace)

    @staticmethod
    async def _until_done(tasks: list[asyncio.Task[None]]) -> None:
        # Not gather: cancelling the plan must not cancel its calls, which end themselves.
        if tasks:
            await asyncio.wait(tasks)

    def _phone(self) -> str:
        self._number += 1
        return f"+1415{self.rng.randint(2000000, 9999999)}"

    def _new_call_id(self) -> str:
        # Never from the seeded generator: ids are unique across workspaces in the store, so a
        # second run with the same seed would make calls the recorder must refuse.
        return new_id("call")

    def _launch(
        self, call_id: str, *, inbound: bool, transport: str | None = None
    ) -> asyncio.Task[None]:
        call = LiveCall(call_id, transport or self.rng.choice(self.plan.transports))
        self.live_calls[call_id] = call
        call.task = asyncio.create_task(self._run_call(call, inbound=inbound))
        return call.task

    async def _run_call(self, call: LiveCall, *, inbound: bool) -> None:
        """Plays one call: an inbound one begins with its `call.initiated`, one placed through
        the API has had it already. It is on record in the ledger from before its first event
        until its end is stored, so a simulator killed meanwhile leaves it to the next."""
        assert self._ledger is not None
        ws = self.plan.workspace_id
        audio: CallAudio | None = None
        try:
            if inbound and await call.pause(self.rng.uniform(0, 2.0) * self.plan.pace):
                return  # stopped before it began
            call.started = time.time()
            await self._ledger.add(call.call_id, call.started)
            if inbound:
                await self.producer.event(
                    "call.initiated",
                    workspace_id=ws,
                    call_id=call.call_id,
                    payload={
                        "direction": "inbound",
                        "from_number": self._phone(),
                        "to_number": "+14155550000",
                        "transport": call.transport,
                    },
                )
            steps = self.script(self.rng, transport=call.transport)
            unsaid = spoken_turns(steps)
            audio = self._call_audio(call.call_id, unsaid)
            for step in steps:
                if await call.pause(step.delay * self.plan.pace):
                    if audio is not None:
                        await audio.stop()
                    if not call.hung_up:  # stopping: the call ends here, as failed
                        call.completing = True
                        await self._end_failed(call.call_id, call.started)
                    break
                call.completing = step.data.get("event_type") == "call.completed"
                if audio is not None:
                    if call.completing:  # the last audio goes out before the end
                        await audio.stop()
                    else:
                        self._voice(audio, step, unsaid)
                await self._play(step, call_id=call.call_id)
            else:
                self.finished_calls.append(call.call_id)
            await self._ledger.remove(call.call_id)
        except Exception as failure:  # the bus is down: the ledger keeps the call for later
            log.warning("simulated call %s stopped: %s", call.call_id, type(failure).__name__)
        finally:
            if audio is not None:
                await audio.stop()
            self.live_calls.pop(call.call_id, None)

    def _call_audio(self, call_id: str, lines: dict[str, tuple[str, str]]) -> CallAudio | None:
        """The call's sound, started, with every line it will say already rendering."""
        if not self.speaking:
            return None
        for role, text in lines.values():
            self.speech.prefetch(role, text)
        ws = self.plan.workspace_id

        async def publish(chunk: bytes) -> None:
            await self.producer.audio(ws, call_id, chunk)

        audio = CallAudio(call_id, publish)
        audio.start()
        return audio

    def _voice(self, audio: CallAudio, step: Step, unsaid: dict[str, tuple[str, str]]) -> None:
        """A turn's speech begins with its first partial; a barge-in cuts the agent short."""
        if step.kind == "turn":
            line = unsaid.pop(step.data["turn_id"], None)
            if line is not None:
                audio.say(step.data["turn_id"], self.speech.render(*line))
        elif step.data.get("event_type") == "call.barge_in":
            audio.cut(step.data["payload"]["turn_id"])

    async def _play(
        self, step: Step, *, call_id: str | None = None, conversation: dict[str, Any] | None = None
    ) -> None:
        ws = self.plan.workspace_id
        if step.kind == "turn":
            assert call_id is not None
            await self.producer.turn(ws, call_id, **step.data)
            return
        payload = dict(step.data["payload"])
        if conversation is not None:
            inbound = payload.get("direction") == "inbound"
            payload.setdefault(
                "from_number", conversation["customer"] if inbound else conversation["business"]
            )
            payload.setdefault(
                "to_number", conversation["business"] if inbound else conversation["customer"]
            )
            await self.producer.event(
                step.data["event_type"],
                workspace_id=ws,
                conversation_id=conversation["id"],
                channel=conversation["channel"],
                payload=payload,
            )
        else:
            await self.producer.event(
                step.data["event_type"], workspace_id=ws, call_id=call_id, payload=payload
            )

    async def _conversation(self) -> None:
        await asyncio.sleep(self.rng.uniform(0, 2.0) * self.plan.pace)
        conversation = {
            "id": new_id("conv"),  # never seeded: see `_new_call_id`
            "channel": self.rng.choice(("sms", "whatsapp")),
            "customer": self._phone(),
            "business": "+14155550001",
        }
        for step in conversation_script(self.rng):
            await asyncio.sleep(step.delay * self.plan.pace)
            await self._play(step, conversation=conversation)

    # --- the media plane ---------------------------------------------------------------------

    async def _on_call_event(self, msg: Msg) -> None:
        """Runs calls placed with POST /v1/calls (their `call.initiated` comes from the API),
        and drops a call that someone else ended (the API's hang-up, if its control message
        was lost)."""
        try:
            envelope = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(envelope, dict) or self._stopping:
            return
        call_id = envelope.get("call_id")
        payload = envelope.get("payload")
        if not isinstance(call_id, str) or not isinstance(payload, dict):
            return
        kind = envelope.get("event_type")
        live = self.live_calls.get(call_id)
        if kind == "call.initiated" and payload.get("direction") == "outbound" and live is None:
            self._launch(call_id, inbound=False, transport=str(payload.get("transport", "sip")))
        elif kind == "call.completed" and live is not None and not live.completing:
            live.hang_up()

    async def _on_control(self, msg: Msg) -> None:
        try:
            command = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return
        call_id = msg.subject.split(".")[3]
        action = command.get("action")
        if action == "hangup":
            call = self.live_calls.get(call_id)
            if call is not None:
                call.hang_up()  # the API has already recorded the end and stores its event
            return
        if action != "send_dtmf" or not msg.reply:
            return
        if call_id not in self.live_calls:
            await msg.respond(
                orjson.dumps(
                    {"ok": False, "error_code": "NOT_FOUND", "message": "The call is not live."}
                )
            )
            return
        await msg.respond(orjson.dumps({"ok": True}))
        await self.producer.event(
            "call.dtmf_sent",
            workspace_id=self.plan.workspace_id,
            call_id=call_id,
            payload={
                "digits": command.get("digits", ""),
                "request_id": command.get("request_id", ""),
            },
        )
