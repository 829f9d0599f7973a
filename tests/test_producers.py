"""Issue 4: the producer API, the recorder (events into the database, idempotent, surviving a
restart), and the simulator seen through REST, the transcript SSE and the WebSocket."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from nats.aio.client import Client
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from switchboard.bus import connect_bus
from switchboard.client.sse import sse_events
from switchboard.db import connect_database
from switchboard.events import EventError, call_events_subject
from switchboard.producer import Producer
from switchboard.recorder.consumer import Recorder
from switchboard.simulate import SimulationPlan, Simulator
from switchboard.simulate.script import call_script, conversation_script
from tests.harness import ServerThread, Workspace, eventually
from tests.test_streams import next_event, ws_url

WAIT = 10.0


class WorkspaceRecorder:
    """A recorder of one workspace only, so a test controls exactly which recorder runs."""

    def __init__(self, database_url: str, nats_url: str, workspace_id: str) -> None:
        self.args = (database_url, nats_url, workspace_id)
        self.recorder: Recorder | None = None

    async def start(self) -> None:
        database_url, nats_url, workspace_id = self.args
        database = await connect_database(database_url, min_size=1, max_size=4)
        bus = await connect_bus(nats_url)
        self.recorder = Recorder(
            database, bus, durable=f"recorder-{workspace_id}", filter_subject=f"vb.{workspace_id}.>"
        )
        await self.recorder.start()

    async def stop(self) -> None:
        if self.recorder is not None:
            await self.recorder.stop()
            await self.recorder.bus.close()
            await self.recorder.database.close()
            self.recorder = None


@pytest.fixture
async def recorder(
    database_url: str, nats_url: str, workspace: Workspace
) -> AsyncIterator[WorkspaceRecorder]:
    running = WorkspaceRecorder(database_url, nats_url, workspace.id)
    await running.start()
    yield running
    await running.stop()


# --- the producer API -----------------------------------------------------------------------


async def test_producer_refuses_what_does_not_fit_the_catalogue(
    bus: Client, workspace: Workspace
) -> None:
    producer = Producer(bus)
    with pytest.raises(EventError, match="not in the catalogue"):
        await producer.event(
            "call.exploded", workspace_id=workspace.id, call_id="call_x", payload={}
        )
    with pytest.raises(EventError, match="interrupted_text"):
        await producer.event(
            "call.barge_in",
            workspace_id=workspace.id,
            call_id="call_x",
            payload={"turn_id": "trn_1"},
        )
    with pytest.raises(EventError, match="channel"):
        await producer.event(
            "message.sent",
            workspace_id=workspace.id,
            conversation_id="conv_x",
            payload={"message_id": "m", "direction": "outbound", "text": "t", "status": "sent"},
        )
    with pytest.raises(EventError, match="role"):
        await producer.turn(
            workspace.id, "call_x", role="robot", text="hi", is_final=True, turn_id="trn_1"
        )
    # And what fits is stored and delivered.
    sub = await bus.subscribe(call_events_subject(workspace.id, "call_ok"))
    await producer.event(
        "call.idle_silence",
        workspace_id=workspace.id,
        call_id="call_ok",
        payload={"silence_ms": 4000, "threshold_ms": 3000},
    )
    assert orjson.loads((await sub.next_msg(timeout=5)).data)["event_type"] == "call.idle_silence"


# --- scripts ----------------------------------------------------------------------------------


def test_scripts_are_lifelike_and_never_barge_in_on_webrtc() -> None:
    barge_ins = {"esl": 0, "sip": 0, "webrtc": 0}
    for seed in range(200):
        for transport in barge_ins:
            steps = call_script(random.Random(seed), transport=transport)
            kinds = [s.data.get("event_type") for s in steps if s.kind == "event"]
            barge_ins[transport] += kinds.count("call.barge_in")
            assert kinds[-2:] == ["call.quality", "call.completed"]
            assert kinds.count("call.completed") == 1
            turns = [s.data for s in steps if s.kind == "turn"]
            # Partials of a turn grow word by word, then its final closes it.
            for turn_id in {t["turn_id"] for t in turns}:
                texts = [t for t in turns if t["turn_id"] == turn_id]
                assert texts[-1]["is_final"] and not any(t["is_final"] for t in texts[:-1])
                assert all(b["text"].startswith(a["text"]) for a, b in itertools.pairwise(texts))
    assert barge_ins["webrtc"] == 0
    assert barge_ins["esl"] > 10 and barge_ins["sip"] > 10
    assert call_script(random.Random(7), transport="sip") == call_script(
        random.Random(7), transport="sip"
    )
    statuses = [
        s.data["payload"]["status"]
        for s in conversation_script(random.Random(3), exchanges=2)
        if s.data["event_type"].startswith("message.")
    ]
    assert statuses[:4] == ["received", "sent", "delivered", "read"]


async def test_a_simulated_webrtc_run_publishes_no_barge_in(
    bus: Client, workspace: Workspace
) -> None:
    seen: list[str] = []

    async def collect(msg: Any) -> None:
        seen.append(orjson.loads(msg.data)["event_type"])

    await bus.subscribe(f"vb.{workspace.id}.call.*.events", cb=collect)
    simulator = Simulator(
        bus,
        SimulationPlan(
            workspace.id, calls=6, conversations=0, seed=11, pace=0.005, transports=("webrtc",)
        ),
    )
    await simulator.start()
    await asyncio.wait_for(simulator.wait(), 30)
    await simulator.stop()
    await bus.flush()
    await eventually(lambda: seen.count("call.completed") == 6)
    assert "call.transcription" in seen and "call.barge_in" not in seen


# --- the recorder -----------------------------------------------------------------------------


async def test_recorder_restarted_mid_call_loses_nothing_and_writes_nothing_twice(
    database_url: str, nats_url: str, workspace: Workspace, bus: Client, client: httpx.AsyncClient
) -> None:
    producer = Producer(bus)
    first = WorkspaceRecorder(database_url, nats_url, workspace.id)
    await first.start()
    call_id = "call_" + "r" * 22
    await producer.event(
        "call.initiated",
        workspace_id=workspace.id,
        call_id=call_id,
        payload={
            "direction": "inbound",
            "from_number": "+14155550177",
            "to_number": "+14155550000",
            "transport": "sip",
        },
    )
    turn_ids = [Producer.new_turn_id() for _ in range(6)]
    for n, turn_id in enumerate(turn_ids[:3]):
        await producer.turn(
            workspace.id, call_id, role="user", text=f"line {n}", is_final=True, turn_id=turn_id
        )
    h = workspace.headers

    async def turns() -> list[dict[str, Any]]:
        response = await client.get(f"/v1/calls/{call_id}", headers=h)
        return response.json()["turns"] if response.status_code == 200 else []

    await eventually(lambda: _at_least(turns, 3))
    await first.stop()  # the recorder dies mid-call
    for n, turn_id in enumerate(turn_ids[3:], start=3):
        await producer.turn(
            workspace.id, call_id, role="agent", text=f"line {n}", is_final=True, turn_id=turn_id
        )
    completed = await producer.event(
        "call.completed",
        workspace_id=workspace.id,
        call_id=call_id,
        payload={"status": "completed", "duration_seconds": 12.5, "ended_by": "user"},
    )
    # The same event stored twice (a producer retry outside the dedupe window looks like this).
    await bus.publish(call_events_subject(workspace.id, call_id), orjson.dumps(completed))
    await bus.flush()
    second = WorkspaceRecorder(database_url, nats_url, workspace.id)
    await second.start()
    try:

        async def done() -> dict[str, Any] | None:
            call = (await client.get(f"/v1/calls/{call_id}", headers=h)).json()
            return call if call["status"] == "completed" and len(call["turns"]) >= 6 else None

        call = await eventually(done)
        assert [t["id"] for t in call["turns"]] == turn_ids
        assert [t["text"] for t in call["turns"]] == [f"line {n}" for n in range(6)]
        assert call["duration_seconds"] == 12.5 and call["ended_by"] == "user"
        assert call["direction"] == "inbound" and call["transport"] == "sip"
        # Nothing more arrives later either.
        await asyncio.sleep(0.3)
        assert len(await turns()) == 6
    finally:
        await second.stop()


async def _at_least(fetch: Any, n: int) -> bool:
    return len(await fetch()) >= n


async def test_recorder_writes_conversations_messages_and_mode_history(
    recorder: WorkspaceRecorder, workspace: Workspace, bus: Client, client: httpx.AsyncClient
) -> None:
    simulator = Simulator(
        bus, SimulationPlan(workspace.id, calls=0, conversations=2, seed=5, pace=0.005)
    )
    await simulator.start()
    await asyncio.wait_for(simulator.wait(), 30)
    await simulator.stop()
    h = workspace.headers

    async def conversations() -> list[dict[str, Any]]:
        found = (await client.get("/v1/conversations", headers=h)).json()["conversations"]
        return found if len(found) == 2 else []

    found = await eventually(conversations)
    for conversation in found:
        detail = await eventually(lambda c=conversation: _messages(client, h, c["id"]))
        inbound = [m for m in detail if m["direction"] == "inbound"]
        assert inbound and all(m["status"] == "received" for m in inbound)
        assert conversation["channel"] in ("sms", "whatsapp")


async def _messages(
    client: httpx.AsyncClient, h: dict[str, str], conversation_id: str
) -> list[dict[str, Any]]:
    detail = (await client.get(f"/v1/conversations/{conversation_id}", headers=h)).json()
    outbound = [m for m in detail["messages"] if m["direction"] == "outbound"]
    # Settled: every AI reply has reached `read` (the script's last status for it).
    if outbound and all(m["status"] == "read" for m in outbound):
        return list(detail["messages"])
    return [] if outbound else list(detail["messages"])


# --- the simulator through every surface -----------------------------------------------------


async def test_a_simulated_call_is_consistent_in_rest_sse_and_websocket(
    recorder: WorkspaceRecorder,
    server: ServerThread,
    workspace: Workspace,
    bus: Client,
    client: httpx.AsyncClient,
) -> None:
    simulator = Simulator(
        bus, SimulationPlan(workspace.id, calls=0, conversations=0, seed=3, pace=0.1)
    )
    await simulator.start()
    h = workspace.headers
    try:
        placed = await client.post(
            "/v1/calls",
            headers=h,
            json={"to_number": "+14155550188", "from_number": "+14155550000", "transport": "esl"},
        )
        call_id = placed.json()["id"]
        ws_events: list[dict[str, Any]] = []
        sse_turns: list[dict[str, Any]] = []

        async def watch_socket() -> int:
            async with ws_connect(ws_url(server, call_id), additional_headers=h) as peer:
                try:
                    while True:
                        ws_events.append(orjson.loads(await asyncio.wait_for(peer.recv(), WAIT)))
                except ConnectionClosed as closed:
                    return closed.rcvd.code if closed.rcvd else 0

        async def watch_transcript() -> str | None:
            async with client.stream(
                "GET", f"/v1/calls/{call_id}/transcript/stream", headers=h
            ) as response:
                events = sse_events(response)
                while True:
                    event = await next_event(events)
                    if event.event is not None:
                        return event.event
                    if event.data:
                        sse_turns.append(orjson.loads(event.data))

        code, ending = await asyncio.wait_for(
            asyncio.gather(watch_socket(), watch_transcript()), 60
        )
    finally:
        await simulator.stop()
    assert code == 1000 and ending == "end"
    kinds = [e["event_type"] for e in ws_events]
    assert kinds[0] == "call.initiated" and kinds[-1] == "call.completed"
    assert kinds.count("call.completed") == 1 and "call.transcription" in kinds
    # The transcript showed partials, then the final of the same turn.
    finals = [t for t in sse_turns if t["is_final"]]
    assert finals
    assert any(
        not t["is_final"] and t["turn_id"] == f["turn_id"] for f in finals for t in sse_turns
    )
    # REST agrees with the WebSocket on every final turn, in order.
    call = await eventually(lambda: _completed_call(client, h, call_id))
    transcribed = [
        e["payload"]["turn_id"] for e in ws_events if e["event_type"] == "call.transcription"
    ]
    assert [t["id"] for t in call["turns"]] == transcribed
    assert {f["turn_id"] for f in finals} <= set(transcribed)
    # And on what the media plane measured at the end: the call's quality, as REST shows it.
    [measured] = [e["payload"] for e in ws_events if e["event_type"] == "call.quality"]
    assert call["quality"] == measured and 1.0 <= call["quality"]["mos"] <= 5.0
    listed = (await client.get("/v1/calls", headers=h)).json()["calls"]
    assert [c["quality"] for c in listed if c["id"] == call_id] == [measured]


async def _completed_call(
    client: httpx.AsyncClient, h: dict[str, str], call_id: str
) -> dict[str, Any] | None:
    call = (await client.get(f"/v1/calls/{call_id}", headers=h)).json()
    return call if call["status"] == "completed" else None


async def test_the_simulated_media_plane_answers_dtmf_and_drops_a_hung_up_call(
    recorder: WorkspaceRecorder,
    server: ServerThread,
    workspace: Workspace,
    bus: Client,
    client: httpx.AsyncClient,
) -> None:
    simulator = Simulator(
        bus, SimulationPlan(workspace.id, calls=0, conversations=0, seed=9, pace=1.0)
    )
    await simulator.start()
    h = workspace.headers
    try:
        placed = await client.post(
            "/v1/calls",
            headers=h,
            json={"to_number": "+14155550189", "from_number": "+14155550000"},
        )
        call_id = placed.json()["id"]
        await eventually(lambda: call_id in simulator.live_calls)
        async with ws_connect(ws_url(server, call_id), additional_headers=h) as peer:
            await peer.send(
                orjson.dumps({"action": "send_dtmf", "digits": "42#", "request_id": "d1"}).decode()
            )
            seen: list[dict[str, Any]] = []
            while not any(e.get("event_type") == "call.dtmf_sent" for e in seen):
                seen.append(orjson.loads(await asyncio.wait_for(peer.recv(), WAIT)))
            kinds = [e["event_type"] for e in seen]
            assert kinds.index("command.result") < kinds.index("call.dtmf_sent")
            result = next(e for e in seen if e["event_type"] == "command.result")
            assert result == {"event_type": "command.result", "request_id": "d1", "ok": True}
            assert (await client.delete(f"/v1/calls/{call_id}", headers=h)).status_code == 200
            await eventually(lambda: call_id not in simulator.live_calls)
            tail = []
            with pytest.raises(ConnectionClosed):
                while True:
                    tail.append(
                        orjson.loads(await asyncio.wait_for(peer.recv(), WAIT))["event_type"]
                    )
            assert tail[-1] == "call.completed" and tail.count("call.completed") == 1
        assert call_id not in simulator.finished_calls  # it was dropped, not played to its end
    finally:
        await simulator.stop()
