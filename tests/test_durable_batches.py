"""A fetched batch is applied at once (one transaction, no savepoint per event, multi-row
statements) and keeps every guarantee of one event at a time: an event is acknowledged only
after what it caused is committed, a redelivery records and routes nothing twice, one bad event
is settled on its own (retried, then parked) without undoing the others, and the order within
a call is the order on the bus. Real NATS and Postgres; the pure parts without either."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest

from switchboard.bus.connection import store_envelope
from switchboard.bus.durable import EventConsumer
from switchboard.embedded import EmbeddedNats
from switchboard.events import EVENTS_STREAM, call_events_subject, make_envelope
from switchboard.ids import new_id
from switchboard.recorder.consumer import Recorder
from switchboard.recorder.effects import first_seen, has_effects, runs
from switchboard.webhooks.router import WebhookRouter, deliveries
from tests.harness import Workspace, eventually
from tests.test_bus_trust import (
    Consumers,
    consumers_on,
    initiated,
    owner_fetch,
    turn,
    unrecordable,
)

pytestmark = pytest.mark.slow


@pytest.fixture
async def consumers(own_nats: EmbeddedNats, database_url: str) -> AsyncIterator[Consumers]:
    """The recorder and the router, created stopped: a test stores its events first, so that
    each consumer's first fetch takes them all as one batch."""
    async with consumers_on(own_nats.client_url, database_url, started=False) as running:
        yield running


def silence(workspace_id: str, call_id: str) -> dict[str, Any]:
    return make_envelope(
        "call.idle_silence",
        workspace_id=workspace_id,
        channel="voice",
        call_id=call_id,
        payload={"silence_ms": 5000, "threshold_ms": 4000},
    )


def completed(workspace_id: str, call_id: str) -> dict[str, Any]:
    return make_envelope(
        "call.completed",
        workspace_id=workspace_id,
        channel="voice",
        call_id=call_id,
        payload={"status": "completed", "duration_seconds": 12.5, "ended_by": "caller"},
    )


def received(workspace_id: str, conversation_id: str, text: str) -> dict[str, Any]:
    return make_envelope(
        "message.received",
        workspace_id=workspace_id,
        channel="sms",
        conversation_id=conversation_id,
        payload={
            "message_id": new_id("msg"),
            "direction": "inbound",
            "text": text,
            "status": "received",
            "from_number": "+14155550100",
            "to_number": "+14155550101",
        },
    )


def mode_changed(workspace_id: str, conversation_id: str) -> dict[str, Any]:
    return make_envelope(
        "conversation.mode_changed",
        workspace_id=workspace_id,
        channel="sms",
        conversation_id=conversation_id,
        payload={"from_mode": "ai", "to_mode": "human", "actor_user_id": "usr_1"},
    )


async def add_endpoint(
    database_url: str, workspace_id: str, event_types: list[str] | None, enabled: bool = True
) -> str:
    endpoint = new_id("whk")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """INSERT INTO webhook_endpoints (id, workspace_id, url, secret, event_types, enabled)
               VALUES ($1, $2, 'https://example.com/hook', 'whsec_x', $3, $4)""",
            endpoint,
            workspace_id,
            event_types,
            enabled,
        )
    finally:
        await conn.close()
    return endpoint


async def settled(consumers: list[EventConsumer]) -> bool:
    """Every stored event delivered to these consumers and acknowledged (or dropped)."""
    for consumer in consumers:
        info = await consumer.bus.js.consumer_info(EVENTS_STREAM, consumer.durable)
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def column(database_url: str, query: str, *args: Any) -> list[Any]:
    return [row[0] for row in await owner_fetch(database_url, query, *args)]


async def test_a_batch_with_a_poison_event_records_routes_and_orders_the_rest_once(
    consumers: Consumers, database_url: str, workspace: Workspace
) -> None:
    ws = workspace.id
    everything = await add_endpoint(database_url, ws, None)
    endings = await add_endpoint(database_url, ws, ["call.completed"])
    disabled = await add_endpoint(database_url, ws, None, enabled=False)
    call_a, call_b = new_id("call"), new_id("call")
    poison = unrecordable(ws)
    repeated = turn(ws, call_a, "a0")
    events = [
        initiated(ws, call_a),
        initiated(ws, call_b),
        repeated,
        turn(ws, call_b, "b0"),
        turn(ws, call_a, "a1"),
        poison,
        silence(ws, call_a),
        turn(ws, call_b, "b1"),
        turn(ws, call_a, "a2"),
        completed(ws, call_a),
    ]
    js = consumers.bus.js
    for envelope in events:
        await store_envelope(js, envelope)
    # A second copy of a turn, stored without Nats-Msg-Id (as a producer that published it
    # twice would leave it): the same batch then holds the same event twice.
    await js.publish(call_events_subject(ws, call_a), orjson.dumps(repeated))
    await consumers.recorder.start()
    await consumers.router.start()

    async def poison_parked() -> list[str]:
        return await column(
            database_url,
            "SELECT reason FROM parked_events WHERE event_id = $1 AND status = 'parked'",
            poison["event_id"],
        )

    reasons = await eventually(poison_parked, within=30)
    assert "failed 3 times" in reasons[0]
    # Everything else was acknowledged: after the commit, so it is all in the database.
    await eventually(lambda: settled([consumers.recorder, consumers.router]), within=30)

    texts = await column(
        database_url,
        "SELECT text FROM turns WHERE call_id = ANY ($1) ORDER BY seq",
        [call_a, call_b],
    )
    assert texts == ["a0", "b0", "a1", "b1", "a2"], "each turn once, in the order of the bus"
    statuses = await column(
        database_url, "SELECT status FROM calls WHERE id = ANY ($1) ORDER BY id", [call_a, call_b]
    )
    assert sorted(statuses) == ["completed", "in_progress"]
    processed = await column(
        database_url, "SELECT event_id FROM processed_events WHERE workspace_id = $1", ws
    )
    recorded = [e["event_id"] for e in events if has_effects(e) and e is not poison]
    assert sorted(processed) == sorted(recorded), "the silence and the poison leave no mark"
    parked = await column(
        database_url, "SELECT event_id FROM parked_events WHERE workspace_id = $1", ws
    )
    assert parked == [poison["event_id"]]

    routed = await column(
        database_url,
        "SELECT event_id FROM webhook_deliveries WHERE endpoint_id = $1 ORDER BY seq",
        everything,
    )
    assert routed == [e["event_id"] for e in events], "every event once, in order"
    assert await column(
        database_url, "SELECT event_type FROM webhook_deliveries WHERE endpoint_id = $1", endings
    ) == ["call.completed"]
    assert (
        await column(
            database_url, "SELECT 1 FROM webhook_deliveries WHERE endpoint_id = $1", disabled
        )
        == []
    )


async def test_a_redelivered_stream_records_and_routes_nothing_twice(
    consumers: Consumers, database_url: str, workspace: Workspace
) -> None:
    """A consumer that crashed after its commits and before its acknowledgements gets the same
    events again: here a second pair of durables reads the whole stream from its start."""
    ws = workspace.id
    endpoint = await add_endpoint(database_url, ws, None)
    call_id, conversation = new_id("call"), new_id("conv")
    events = [
        initiated(ws, call_id),
        *(turn(ws, call_id, f"turn {n}") for n in range(5)),
        received(ws, conversation, "hello"),
        mode_changed(ws, conversation),
        received(ws, conversation, "anyone?"),
        silence(ws, call_id),
        completed(ws, call_id),
    ]
    for envelope in events:
        await store_envelope(consumers.bus.js, envelope)
    await consumers.recorder.start()
    await consumers.router.start()
    await eventually(lambda: settled([consumers.recorder, consumers.router]), within=30)

    queries = {
        "turns": ("SELECT text FROM turns WHERE call_id = $1 ORDER BY seq", call_id),
        "call": ("SELECT status FROM calls WHERE id = $1", call_id),
        "messages": (
            "SELECT text FROM messages WHERE conversation_id = $1 ORDER BY text",
            conversation,
        ),
        "mode": ("SELECT ai_mode FROM conversations WHERE id = $1", conversation),
        "changes": (
            "SELECT event_id FROM conversation_mode_changes WHERE conversation_id = $1",
            conversation,
        ),
        "processed": ("SELECT event_id FROM processed_events WHERE workspace_id = $1", ws),
        "deliveries": (
            "SELECT event_id FROM webhook_deliveries WHERE endpoint_id = $1 ORDER BY seq",
            endpoint,
        ),
    }

    async def state() -> dict[str, list[Any]]:
        return {name: await column(database_url, *query) for name, query in queries.items()}

    first = await state()
    assert first["turns"] == [f"turn {n}" for n in range(5)]
    assert first["call"] == ["completed"]
    assert first["messages"] == ["anyone?", "hello"]
    assert first["mode"] == ["human"]
    assert first["deliveries"] == [e["event_id"] for e in events]

    again = [
        Recorder(
            consumers.database, consumers.bus, durable="recorder-again", filter_subject=f"vb.{ws}.>"
        ),
        WebhookRouter(
            consumers.database,
            consumers.bus,
            durable="webhooks-router-again",
            filter_subject=f"vb.{ws}.>",
        ),
    ]
    for consumer in again:
        await consumer.start()
    try:
        await eventually(lambda: settled(list(again)), within=30)
    finally:
        for consumer in again:
            await consumer.stop()
    assert all(consumer.handled == len(events) for consumer in again), "all acknowledged"
    assert await state() == first


async def test_batches_of_a_workspace_that_does_not_exist_are_dropped(
    consumers: Consumers, database_url: str
) -> None:
    ghost, quiet_ghost = new_id("ws"), new_id("ws")
    call_id = new_id("call")
    for envelope in (
        initiated(ghost, call_id),
        turn(ghost, call_id, "nobody"),
        silence(ghost, call_id),
        # A batch of only events the recorder writes nothing for is still checked.
        silence(quiet_ghost, new_id("call")),
        silence(quiet_ghost, new_id("call")),
    ):
        await store_envelope(consumers.bus.js, envelope)
    await consumers.recorder.start()
    await eventually(lambda: settled([consumers.recorder]), within=30)
    assert consumers.recorder.handled == 0, "dropped (terminated), not acknowledged as applied"
    for table in ("calls", "turns", "processed_events"):
        rows = await column(
            database_url,
            f"SELECT 1 FROM {table} WHERE workspace_id = ANY ($1)",
            [ghost, quiet_ghost],
        )
        assert rows == [], table


async def test_quiet_batches_of_a_known_workspace_are_acknowledged_without_a_transaction(
    consumers: Consumers, database_url: str, workspace: Workspace
) -> None:
    """The first batch the recorder writes nothing for checks its workspace; later ones in the
    same workspace are acknowledged as applied without another look (workspaces are never
    deleted), and a batch with something to write still writes it."""
    ws, call_id = workspace.id, new_id("call")
    recorder = consumers.recorder
    for _ in range(2):
        await store_envelope(consumers.bus.js, silence(ws, call_id))
    await recorder.start()
    await eventually(lambda: settled([recorder]), within=30)
    assert recorder.handled == 2
    assert ws in recorder.known_workspaces
    later = [silence(ws, call_id), initiated(ws, call_id), silence(ws, call_id)]
    for envelope in later:
        await store_envelope(consumers.bus.js, envelope)
    await eventually(lambda: settled([recorder]), within=30)
    assert recorder.handled == 5
    processed = await column(
        database_url, "SELECT event_id FROM processed_events WHERE workspace_id = $1", ws
    )
    assert processed == [later[1]["event_id"]]


def test_runs_group_consecutive_turns_and_keep_everything_in_order() -> None:
    ws, call_id = new_id("ws"), new_id("call")
    start, t1, t2, quiet, t3, end = (
        initiated(ws, call_id),
        turn(ws, call_id, "1"),
        turn(ws, call_id, "2"),
        silence(ws, call_id),
        turn(ws, call_id, "3"),
        completed(ws, call_id),
    )
    assert runs([start, t1, t2, quiet, t3, end]) == [[start], [t1, t2], [quiet], [t3], [end]]
    assert runs([]) == []


def test_first_seen_keeps_the_first_copy_of_each_new_event_in_order() -> None:
    ws, call_id = new_id("ws"), new_id("call")
    a, b, c = (turn(ws, call_id, text) for text in "abc")
    new = {a["event_id"], c["event_id"]}
    assert first_seen([a, b, a, c, c], new) == [a, c]
    assert new == {a["event_id"], c["event_id"]}, "the caller's set is left alone"


def test_deliveries_follow_each_endpoints_filter_and_the_order_of_events() -> None:
    ws, call_id = new_id("ws"), new_id("call")
    start, quiet, end = initiated(ws, call_id), silence(ws, call_id), completed(ws, call_id)
    endpoints = [
        {"id": "whk_all", "event_types": None},
        {"id": "whk_ends", "event_types": ["call.completed", "call.initiated"]},
        {"id": "whk_none", "event_types": []},
    ]
    rows = deliveries(endpoints, [start, quiet, end])
    assert [(endpoint, event) for _id, endpoint, event, _type, _body in rows] == [
        ("whk_all", start["event_id"]),
        ("whk_ends", start["event_id"]),
        ("whk_all", quiet["event_id"]),
        ("whk_all", end["event_id"]),
        ("whk_ends", end["event_id"]),
    ]
    assert len({row[0] for row in rows}) == len(rows), "a delivery id each"
    assert orjson.loads(rows[2][4]) == quiet, "the body is the envelope as received"
    assert deliveries([], [start]) == []
