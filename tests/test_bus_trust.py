"""The bus is trusted no further than its subject (SPEC section 7), and one workspace's poison
cannot stall another's events: the recorder and the webhook router drop and count an envelope
whose workspace or id differs from its subject's; an event for a call or conversation that has
not appeared waits without holding up the bus, is applied when that one appears, and is parked
(visible, replayable) when it never does; an event that fails every attempt is parked too."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from nats.aio.client import Client

from switchboard.bus import Bus, connect_bus
from switchboard.bus.connection import store_envelope
from switchboard.db import Database, connect_database
from switchboard.embedded import EmbeddedNats
from switchboard.events import call_events_subject, conversation_events_subject, make_envelope
from switchboard.ids import new_id
from switchboard.live.metrics import Metrics
from switchboard.recorder.consumer import Recorder
from switchboard.webhooks.router import WebhookRouter
from tests.harness import ServerThread, Workspace, eventually

pytestmark = pytest.mark.slow


class Consumers:
    def __init__(self, database: Database, bus: Bus, metrics: Metrics) -> None:
        self.database = database
        self.bus = bus
        self.metrics = metrics
        self.recorder = Recorder(database, bus, metrics=metrics)
        self.router = WebhookRouter(database, bus, metrics=metrics)


@asynccontextmanager
async def consumers_on(
    nats_url: str, database_url: str, *, started: bool
) -> AsyncIterator[Consumers]:
    """The recorder and the webhook router on their own database pool and bus connection,
    started or not (a test that stores its events first starts them itself)."""
    database = await connect_database(database_url, min_size=1, max_size=4)
    bus = await connect_bus(nats_url)
    running = Consumers(database, bus, Metrics())
    try:
        if started:
            await running.recorder.start()
            await running.router.start()
        yield running
    finally:
        await running.recorder.stop()
        await running.router.stop()
        await bus.close()
        await database.close()


@pytest.fixture
async def consumers(own_nats: EmbeddedNats, database_url: str) -> AsyncIterator[Consumers]:
    async with consumers_on(own_nats.client_url, database_url, started=True) as running:
        yield running


def initiated(workspace_id: str, call_id: str) -> dict[str, Any]:
    return make_envelope(
        "call.initiated",
        workspace_id=workspace_id,
        channel="voice",
        call_id=call_id,
        payload={
            "direction": "inbound",
            "from_number": "+14155550101",
            "to_number": "+14155550100",
            "transport": "sip",
        },
    )


def turn(workspace_id: str, call_id: str, text: str = "hello") -> dict[str, Any]:
    return make_envelope(
        "call.transcription",
        workspace_id=workspace_id,
        channel="voice",
        call_id=call_id,
        payload={"turn_id": new_id("trn"), "role": "user", "text": text},
    )


def unrecordable(workspace_id: str) -> dict[str, Any]:
    """A message Postgres refuses (a NUL in its text): it can never be recorded as it is."""
    return make_envelope(
        "message.received",
        workspace_id=workspace_id,
        channel="sms",
        conversation_id=new_id("conv"),
        payload={
            "message_id": new_id("msg"),
            "direction": "inbound",
            "text": "nul \x00 here",
            "status": "received",
            "from_number": "+14155550100",
            "to_number": "+14155550101",
        },
    )


async def owner_fetch(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def events_cli(database_url: str, *args: str) -> str:
    """`switchboard events ...` as an operator runs it; its stdout."""
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "switchboard", "events", *args],
        env={**os.environ, "SWITCHBOARD_DATABASE_URL": database_url},
        capture_output=True,
        check=True,
        timeout=60,
        text=True,
    )
    return done.stdout


async def recorded_call(database_url: str, call_id: str) -> asyncpg.Record | None:
    rows = await owner_fetch(database_url, "SELECT * FROM calls WHERE id = $1", call_id)
    return rows[0] if rows else None


async def test_an_envelope_naming_another_workspace_is_dropped_and_counted(
    consumers: Consumers, database_url: str, workspace: Workspace, other_workspace: Workspace
) -> None:
    # Workspace B has a webhook endpoint that takes every event.
    conn = await asyncpg.connect(database_url)
    try:
        endpoint = new_id("whk")
        await conn.execute(
            """INSERT INTO webhook_endpoints (id, workspace_id, url, secret)
               VALUES ($1, $2, 'https://example.com/hook', 'whsec_x')""",
            endpoint,
            other_workspace.id,
        )
    finally:
        await conn.close()
    js = consumers.bus.js
    # Published on A's subject, naming B inside: a forged or buggy producer.
    forged = initiated(other_workspace.id, new_id("call"))
    await js.publish(
        call_events_subject(workspace.id, forged["call_id"]), orjson.dumps(forged), timeout=5
    )
    # Right workspace, another call's subject.
    misfiled = initiated(workspace.id, new_id("call"))
    await js.publish(call_events_subject(workspace.id, new_id("call")), orjson.dumps(misfiled))
    # Then an honest event for B, which both consumers handle after the forged ones.
    honest = initiated(other_workspace.id, new_id("call"))
    await store_envelope(js, honest)

    await eventually(lambda: recorded_call(database_url, honest["call_id"]), within=20)

    async def routed() -> bool:
        rows = await owner_fetch(
            database_url, "SELECT 1 FROM webhook_deliveries WHERE event_id = $1", honest["event_id"]
        )
        return bool(rows)

    await eventually(routed, within=20)
    assert await recorded_call(database_url, forged["call_id"]) is None
    assert await recorded_call(database_url, misfiled["call_id"]) is None
    deliveries = await owner_fetch(
        database_url,
        "SELECT event_id FROM webhook_deliveries WHERE endpoint_id = $1",
        endpoint,
    )
    assert [d["event_id"] for d in deliveries] == [honest["event_id"]]
    # Each consumer dropped both envelopes and counted them.
    rejected = consumers.metrics.counter("switchboard_events_rejected_total", "", "reason")
    assert rejected["subject_mismatch"] == 4
    assert 'switchboard_events_rejected_total{reason="subject_mismatch"} 4' in (
        consumers.metrics.render()
    )


async def test_events_for_a_call_that_has_not_appeared_do_not_stall_other_workspaces(
    consumers: Consumers, database_url: str, workspace: Workspace, other_workspace: Workspace
) -> None:
    js = consumers.bus.js
    missing_call = new_id("call")
    # More poison than the consumer's max_ack_pending (1,000): retried in place, these would
    # hold every slot and no later event of any workspace would ever be delivered.
    for n in range(1_100):
        await store_envelope(js, turn(workspace.id, missing_call, f"turn {n}"))
    other_call = initiated(other_workspace.id, new_id("call"))
    await store_envelope(js, other_call)
    await eventually(lambda: recorded_call(database_url, other_call["call_id"]), within=60)

    # The waiting turns are applied, in order, the moment their call appears.
    await store_envelope(js, initiated(workspace.id, missing_call))

    async def turns() -> list[asyncpg.Record]:
        rows = await owner_fetch(
            database_url, "SELECT text FROM turns WHERE call_id = $1 ORDER BY seq", missing_call
        )
        return rows if len(rows) == 1_100 else []

    recorded = await eventually(turns, within=60)
    assert [r["text"] for r in recorded[:3]] == ["turn 0", "turn 1", "turn 2"]
    waiting = await owner_fetch(
        database_url, "SELECT 1 FROM parked_events WHERE waits_for = $1", missing_call
    )
    assert waiting == []


async def test_an_event_whose_conversation_never_appears_is_parked_and_replayable(
    consumers: Consumers, database_url: str, workspace: Workspace
) -> None:
    conversation = new_id("conv")
    mode_change = make_envelope(
        "conversation.mode_changed",
        workspace_id=workspace.id,
        channel="sms",
        conversation_id=conversation,
        payload={"from_mode": "ai", "to_mode": "human", "actor_user_id": "usr_1"},
    )
    await store_envelope(consumers.bus.js, mode_change)

    async def status() -> str | None:
        rows = await owner_fetch(
            database_url,
            "SELECT status FROM parked_events WHERE event_id = $1",
            mode_change["event_id"],
        )
        return str(rows[0]["status"]) if rows else None

    assert await eventually(status, within=20) == "waiting"
    consumers.recorder.wait_limit = 0.0  # as if an hour had passed
    assert await consumers.recorder.sweep() >= 1
    assert await status() == "parked"
    parked = consumers.metrics.counter("switchboard_events_parked_total", "", "consumer")
    assert parked["recorder"] >= 1

    # An operator sees it, makes the conversation appear, and replays it.
    listed = await events_cli(database_url, "parked", "--workspace", workspace.id, "--json")
    assert mode_change["event_id"] in [e["event_id"] for e in orjson.loads(listed)]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """INSERT INTO conversations (id, workspace_id, channel, customer_number,
                                          business_number)
               VALUES ($1, $2, 'sms', '+14155550100', '+14155550101')""",
            conversation,
            workspace.id,
        )
    finally:
        await conn.close()
    replayed = await events_cli(
        database_url, "replay", mode_change["event_id"], "--workspace", workspace.id
    )
    assert "recorder: applied" in replayed
    assert await status() is None
    changes = await owner_fetch(
        database_url,
        "SELECT to_mode FROM conversation_mode_changes WHERE event_id = $1",
        mode_change["event_id"],
    )
    assert [c["to_mode"] for c in changes] == ["human"]


async def test_an_event_that_fails_every_attempt_is_parked_not_retried_forever(
    consumers: Consumers, database_url: str, workspace: Workspace, bus: Client
) -> None:
    poison = unrecordable(workspace.id)
    await store_envelope(consumers.bus.js, poison)
    subject = conversation_events_subject(workspace.id, poison["conversation_id"])

    async def parked_reason() -> str | None:
        rows = await owner_fetch(
            database_url,
            "SELECT reason FROM parked_events WHERE event_id = $1 AND status = 'parked'",
            poison["event_id"],
        )
        return str(rows[0]["reason"]) if rows else None

    reason = await eventually(parked_reason, within=30)
    assert "failed 3 times" in reason, (subject, reason)


async def test_live_streams_never_show_an_envelope_that_disagrees_with_its_subject(
    server: ServerThread, bus: Client, workspace: Workspace, other_workspace: Workspace
) -> None:
    h = workspace.headers
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as client:
        first = await client.post(
            "/v1/messages",
            headers=h,
            json={
                "channel": "sms",
                "to_number": "+14155550170",
                "from_number": "+14155550171",
                "text": "first",
            },
        )
        conversation = first.json()["conversation_id"]
        subject = conversation_events_subject(workspace.id, conversation)

        def received(workspace_id: str, conversation_id: str, text: str) -> bytes:
            return orjson.dumps(
                make_envelope(
                    "message.received",
                    workspace_id=workspace_id,
                    channel="sms",
                    conversation_id=conversation_id,
                    payload={
                        "message_id": new_id("msg"),
                        "direction": "inbound",
                        "text": text,
                        "status": "received",
                    },
                )
            )

        async with client.stream(
            "GET", f"/v1/conversations/{conversation}/stream", headers=h
        ) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            await bus.publish(subject, received(other_workspace.id, conversation, "forged ws"))
            await bus.publish(subject, received(workspace.id, new_id("conv"), "misfiled"))
            await bus.publish(subject, received(workspace.id, conversation, "honest"))
            texts: list[str] = []
            while "honest" not in texts:
                line = await asyncio.wait_for(anext(lines), 10)
                if line.startswith("data:"):
                    texts.append(orjson.loads(line[5:])["payload"]["text"])
        metrics = (await client.get("/metrics")).text
    assert "forged ws" not in texts and "misfiled" not in texts
    name = 'switchboard_live_messages_rejected_total{reason="subject_mismatch"} '
    counted = [line for line in metrics.splitlines() if line.startswith(name)]
    assert counted and int(counted[0].split()[-1]) >= 2, counted


async def test_a_poison_event_in_a_batch_of_its_workspace_spoils_none_of_the_others(
    consumers: Consumers, database_url: str, workspace: Workspace
) -> None:
    # Stored while the recorder is stopped, so that it fetches them together: one workspace's
    # events are applied in one transaction, each in a savepoint.
    await consumers.recorder.stop()
    call_id = new_id("call")
    poison = unrecordable(workspace.id)
    early = turn(workspace.id, call_id, "before the start")  # waits for the call
    for envelope in (
        early,
        initiated(workspace.id, call_id),
        poison,
        *(turn(workspace.id, call_id, f"turn {n}") for n in range(3)),
    ):
        await store_envelope(consumers.bus.js, envelope)
    await consumers.recorder.start()

    async def texts() -> list[str]:
        rows = await owner_fetch(database_url, "SELECT text FROM turns WHERE call_id = $1", call_id)
        return [str(r["text"]) for r in rows]

    await eventually(lambda: _has(texts, 4), within=30)
    assert sorted(await texts()) == ["before the start", "turn 0", "turn 1", "turn 2"]

    async def parked() -> bool:
        rows = await owner_fetch(
            database_url,
            "SELECT 1 FROM parked_events WHERE event_id = $1 AND status = 'parked'",
            poison["event_id"],
        )
        return bool(rows)

    await eventually(parked, within=30)


async def _has(texts: Any, count: int) -> bool:
    return len(await texts()) >= count
