"""Plays scripts on the bus, and plays the media plane for one workspace: it runs calls placed
with `POST /v1/calls`, answers DTMF commands (then emits `call.dtmf_sent`), and drops a call
the API hung up (the API itself publishes that call's `call.completed`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass
from typing import Any

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from switchboard.producer import Producer
from switchboard.simulate.script import Step, call_script, conversation_script

log = logging.getLogger(__name__)

TRANSPORTS = ("esl", "sip", "webrtc")


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


class Simulator:
    def __init__(self, client: Client, plan: SimulationPlan) -> None:
        self.client = client
        self.plan = plan
        self.producer = Producer(client)
        self.rng = random.Random(plan.seed)
        self.live_calls: dict[str, asyncio.Task[None]] = {}
        self.finished_calls: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._subscriptions: list[Subscription] = []
        self._number = 0

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        ws = self.plan.workspace_id
        self._subscriptions.append(
            await self.client.subscribe(f"vb.{ws}.call.*.control", cb=self._on_control)
        )
        self._subscriptions.append(
            await self.client.subscribe(f"vb.{ws}.call.*.events", cb=self._on_call_event)
        )
        await self.client.flush()
        self._tasks.append(asyncio.create_task(self._run_plan()))

    async def wait(self) -> None:
        """Until the plan's calls and conversations have all played (not for `forever`)."""
        await asyncio.gather(*self._tasks)

    async def stop(self) -> None:
        for task in [*self._tasks, *self.live_calls.values()]:
            task.cancel()
        for task in [*self._tasks, *self.live_calls.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    # --- the plan ----------------------------------------------------------------------------

    async def _run_plan(self) -> None:
        while True:
            plays = [self._inbound_call() for _ in range(self.plan.calls)]
            plays += [self._conversation() for _ in range(self.plan.conversations)]
            await asyncio.gather(*plays)
            if not self.plan.forever:
                return
            await asyncio.sleep(self.rng.uniform(2.0, 6.0) * self.plan.pace)

    def _phone(self) -> str:
        self._number += 1
        return f"+1415{self.rng.randint(2000000, 9999999)}"

    async def _inbound_call(self) -> None:
        await asyncio.sleep(self.rng.uniform(0, 2.0) * self.plan.pace)
        call_id = "call_" + "".join(
            self.rng.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(22)
        )
        transport = self.rng.choice(self.plan.transports)
        await self.producer.event(
            "call.initiated",
            workspace_id=self.plan.workspace_id,
            call_id=call_id,
            payload={
                "direction": "inbound",
                "from_number": self._phone(),
                "to_number": "+14155550000",
                "transport": transport,
            },
        )
        await self._play_call(call_id, transport)

    async def _play_call(self, call_id: str, transport: str) -> None:
        steps = call_script(self.rng, transport=transport)
        task = asyncio.current_task()
        assert task is not None
        self.live_calls[call_id] = task
        try:
            for step in steps:
                await asyncio.sleep(step.delay * self.plan.pace)
                await self._play(step, call_id=call_id)
            self.finished_calls.append(call_id)
        finally:
            self.live_calls.pop(call_id, None)

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
            "id": "conv_"
            + "".join(self.rng.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(22)),
            "channel": self.rng.choice(("sms", "whatsapp")),
            "customer": self._phone(),
            "business": "+14155550001",
        }
        for step in conversation_script(self.rng):
            await asyncio.sleep(step.delay * self.plan.pace)
            await self._play(step, conversation=conversation)

    # --- the media plane ---------------------------------------------------------------------

    async def _on_call_event(self, msg: Msg) -> None:
        """Runs calls placed with POST /v1/calls (their `call.initiated` comes from the API)."""
        try:
            envelope = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return
        if (
            envelope.get("event_type") == "call.initiated"
            and envelope.get("payload", {}).get("direction") == "outbound"
            and envelope["call_id"] not in self.live_calls
        ):
            transport = envelope["payload"].get("transport", "sip")
            self._tasks.append(asyncio.create_task(self._play_call(envelope["call_id"], transport)))

    async def _on_control(self, msg: Msg) -> None:
        try:
            command = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return
        call_id = msg.subject.split(".")[3]
        action = command.get("action")
        if action == "hangup":
            task = self.live_calls.pop(call_id, None)
            if task is not None:
                task.cancel()  # the API has already recorded and published the end
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
