"""No phantom writes (SPEC section 6): a REST write and its event commit together in Postgres
and the outbox relay puts the event on the bus exactly once, in commit order, across a bus that
is killed and restarted on the same port and store, a relay that dies between publishing and
forgetting, and an event that an earlier attempt stored longer ago than the duplicate window."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import nats
import orjson
import pytest
from nats.js.errors import NotFoundError

from switchboard.bus.connection import store_envelope
from switchboard.config import Settings
from switchboard.embedded import EmbeddedNats
from switchboard.events import (
    EVENTS_STREAM,
    call_events_subject,
    conversation_events_subject,
    make_envelope,
)
from tests.harness import (
    ServerThread,
    Workspace,
    eventually,
    new_workspace,
)

pytestmark = pytest.mark.slow

CALL = {"to_number": "+14155550100", "from_number": "+14155550101"}
SMS = {"channel": "sms", "to_number": "+14155550102", "from_number": "+14155550103"}


@pytest.fixture
async def own_server(
    own_nats: EmbeddedNats, own_database: str
) -> AsyncIterator[tuple[ServerThread, httpx.AsyncClient]]:
    settings = Settings(database_url=own_database, nats_url=own_nats.client_url)
    server = ServerThread(settings, own_database, own_nats.client_url).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
            yield server, client
    finally:
        server.stop()


class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def kill_hard(server: EmbeddedNats) -> None:
    """kill -9: no goodbye to the clients, nothing flushed."""
    assert server.process is not None
    server.process.popen.kill()
    server.process.popen.wait(10)
    server.process = None


async def stored_events(nats_url: str, subject: str) -> list[dict[str, Any]]:
    """Every envelope JetStream holds on `subject`, in stream order."""
    connection = await nats.connect(nats_url)
    try:
        js = connection.jetstream()
        found: list[dict[str, Any]] = []
        seq = 0
        while True:
            try:
                raw = await js.get_msg(EVENTS_STREAM, seq=seq + 1, subject=subject, next=True)
            except NotFoundError:
                return found
            seq = int(raw.seq or 0)
            found.append(orjson.loads(raw.data or b"{}"))
    finally:
        await connection.close()


async def outbox_size(database_url: str, workspace_id: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM event_outbox WHERE workspace_id = $1", workspace_id
        )
    finally:
        await conn.close()
    return int(count)


async def test_writes_during_a_bus_outage_commit_and_their_events_flow_once_in_order(
    own_nats: EmbeddedNats,
    own_server: tuple[ServerThread, httpx.AsyncClient],
    own_database: str,
) -> None:
    _server, client = own_server
    workspace = await new_workspace(own_database)
    database_url = own_database
    h = workspace.headers
    before = await client.post("/v1/calls", headers=h, json=CALL)
    assert before.status_code == 201
    ended_call = before.json()["id"]
    first = await client.post("/v1/messages", headers=h, json={**SMS, "text": "before"})
    conversation = first.json()["conversation_id"]

    log = Collected()
    logging.getLogger("switchboard").addHandler(log)
    kill_hard(own_nats)
    # Every kind of write succeeds while the bus is down: the row and its event commit together.
    placed = await client.post("/v1/calls", headers=h, json=CALL)
    assert placed.status_code == 201, placed.text
    hung_up = await client.delete(f"/v1/calls/{ended_call}", headers=h)
    assert hung_up.status_code == 200, hung_up.text
    assert hung_up.json()["status"] == "completed"
    handed = await client.patch(
        f"/v1/conversations/{conversation}", headers=h, json={"ai_mode": "human"}
    )
    assert handed.status_code == 200, handed.text
    # Two writes to one conversation at once: neither waits on a lock held across a publish.
    texts = [f"during {n}" for n in range(6)]
    concurrent = await asyncio.gather(
        *(
            client.post(
                "/v1/messages", headers=h, json={"conversation_id": conversation, "text": text}
            )
            for text in texts[:2]
        )
    )
    assert [r.status_code for r in concurrent] == [201, 201]
    for text in texts[2:]:
        sent = await client.post(
            "/v1/messages", headers=h, json={"conversation_id": conversation, "text": text}
        )
        assert sent.status_code == 201, sent.text
    assert await outbox_size(database_url, workspace.id) >= 9, "the events wait in the outbox"

    own_nats.start()  # same port, same store
    await eventually(lambda: _outbox_empty(database_url, workspace.id), within=30)
    logging.getLogger("switchboard").removeHandler(log)
    # The outage was logged as an outage (down, back), not as a traceback per retry.
    assert not [r for r in log.records if r.exc_info], [r.getMessage() for r in log.records]
    assert len(log.records) <= 8, [r.getMessage() for r in log.records]
    assert any("available again" in r.getMessage() for r in log.records)

    new_call = await stored_events(
        own_nats.client_url, call_events_subject(workspace.id, placed.json()["id"])
    )
    assert [e["event_type"] for e in new_call] == ["call.initiated"]
    old_call = await stored_events(
        own_nats.client_url, call_events_subject(workspace.id, ended_call)
    )
    assert [e["event_type"] for e in old_call] == ["call.initiated", "call.completed"]
    assert old_call[1]["payload"]["ended_by"] == "api"
    chat = await stored_events(
        own_nats.client_url, conversation_events_subject(workspace.id, conversation)
    )
    kinds = [e["event_type"] for e in chat]
    assert kinds == ["message.sent", "conversation.mode_changed"] + ["message.sent"] * 6
    ids = [e["event_id"] for e in chat]
    assert len(set(ids)) == len(ids), "every event exactly once"
    # Commit order within the conversation: the sequential sends keep theirs.
    assert [e["payload"]["text"] for e in chat[-4:]] == texts[2:]


async def _outbox_empty(database_url: str, workspace_id: str) -> bool:
    return await outbox_size(database_url, workspace_id) == 0


async def stage_directly(database_url: str, envelope: dict[str, Any], age_seconds: float) -> None:
    """An outbox row as a REST write leaves it, staged `age_seconds` ago (as the owner)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """INSERT INTO event_outbox (workspace_id, event_id, subject, body, created_at)
               VALUES ($1, $2, $3, $4, now() - make_interval(secs => $5))""",
            envelope["workspace_id"],
            envelope["event_id"],
            call_events_subject(envelope["workspace_id"], envelope["call_id"]),
            orjson.dumps(envelope),
            age_seconds,
        )
    finally:
        await conn.close()


def initiated(workspace_id: str, call_id: str) -> dict[str, Any]:
    return make_envelope(
        "call.initiated",
        workspace_id=workspace_id,
        channel="voice",
        call_id=call_id,
        payload={
            "direction": "outbound",
            "from_number": "+14155550101",
            "to_number": "+14155550100",
            "transport": "sip",
        },
    )


async def test_the_relay_never_stores_an_event_twice(
    server: ServerThread, nats_url: str, database_url: str, workspace: Workspace
) -> None:
    """A relay that died after publishing but before forgetting leaves its row behind: the next
    publish must not store the event again, whether JetStream's duplicate window still covers it
    (recent rows) or not (old rows: the relay looks for the event in the subject's history)."""
    from switchboard.ids import new_id

    connection = await nats.connect(nats_url)
    try:
        js = connection.jetstream()
        # Stored long ago by a relay that died before deleting its row; the duplicate window
        # has passed, so only the history check can tell. (Published with no Nats-Msg-Id, so the
        # server's window cannot be what saves it here.)
        old = initiated(workspace.id, new_id("call"))
        await js.publish(
            call_events_subject(workspace.id, old["call_id"]), orjson.dumps(old), timeout=5
        )
        # Stored just now by a relay that died before deleting its row.
        recent = initiated(workspace.id, new_id("call"))
        await store_envelope(js, recent)
        # Old, and never stored: the history check must not hold it back.
        lost = initiated(workspace.id, new_id("call"))
    finally:
        await connection.close()
    await stage_directly(database_url, old, age_seconds=600)
    await stage_directly(database_url, recent, age_seconds=0)
    await stage_directly(database_url, lost, age_seconds=600)

    await eventually(lambda: _outbox_empty(database_url, workspace.id), within=15)
    for envelope in (old, recent, lost):
        subject = call_events_subject(workspace.id, envelope["call_id"])
        stored = await stored_events(nats_url, subject)
        assert [e["event_id"] for e in stored] == [envelope["event_id"]]
