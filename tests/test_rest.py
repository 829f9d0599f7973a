"""SPEC section 9: the REST core, its events on the bus, its errors, and its OpenAPI."""

from __future__ import annotations

import asyncio

import httpx
import nats
import orjson
import pytest
from nats.aio.client import Client

from switchboard.events import check_envelope
from tests.harness import ServerThread, Workspace, insert_turn
from tests.routes import routes


async def next_event(sub: object, wait: float = 5.0) -> dict[str, object]:
    msg = await sub.next_msg(timeout=wait)  # type: ignore[attr-defined]
    envelope: dict[str, object] = orjson.loads(msg.data)
    check_envelope(envelope)
    return envelope


def assert_invalid(response: httpx.Response, field: str) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error_code"] == "INVALID_ARGUMENT"
    assert field in body["message"], body["message"]
    assert response.headers["x-request-id"] == body["request_id"]


async def test_workspace_and_agents(client: httpx.AsyncClient, workspace: Workspace) -> None:
    h = workspace.headers
    ws = (await client.get("/v1/workspace", headers=h)).json()
    assert ws["id"] == workspace.id and ws["name"] == "workspace A"
    assert ws["created_at"].endswith("Z") and len(ws["created_at"]) == 24
    created = await client.post(
        "/v1/agents", headers=h, json={"name": "Ava", "instructions": "Be kind"}
    )
    assert created.status_code == 201
    agent = created.json()
    assert agent["id"].startswith("agt_")
    patched = await client.patch(f"/v1/agents/{agent['id']}", headers=h, json={"name": "Ava 2"})
    assert patched.json()["name"] == "Ava 2" and patched.json()["instructions"] == "Be kind"
    assert (await client.get(f"/v1/agents/{agent['id']}", headers=h)).json()["name"] == "Ava 2"
    assert [a["id"] for a in (await client.get("/v1/agents", headers=h)).json()["agents"]] == [
        agent["id"]
    ]


async def test_calls_publish_their_events_and_hang_up(
    client: httpx.AsyncClient, workspace: Workspace, bus: Client, database_url: str
) -> None:
    h = workspace.headers
    sub = await bus.subscribe(f"vb.{workspace.id}.call.*.events")
    control = await bus.subscribe(f"vb.{workspace.id}.call.*.control")
    created = await client.post(
        "/v1/calls",
        headers=h,
        json={"to_number": "+14155550100", "from_number": "+14155550101", "transport": "esl"},
    )
    assert created.status_code == 201, created.text
    call = created.json()
    assert call["status"] == "in_progress" and call["direction"] == "outbound"
    initiated = await next_event(sub)
    assert initiated["event_type"] == "call.initiated" and initiated["call_id"] == call["id"]
    assert initiated["payload"] == {
        "direction": "outbound",
        "from_number": "+14155550101",
        "to_number": "+14155550100",
        "transport": "esl",
    }
    first = await insert_turn(database_url, workspace.id, call["id"], "user", "Hello?")
    second = await insert_turn(
        database_url, workspace.id, call["id"], "agent", "Hi, how can I help?"
    )
    detail = (await client.get(f"/v1/calls/{call['id']}", headers=h)).json()
    assert [t["id"] for t in detail["turns"]] == [first, second]
    assert [t["role"] for t in detail["turns"]] == ["user", "agent"]

    ended = await client.delete(f"/v1/calls/{call['id']}", headers=h)
    assert ended.status_code == 200
    assert ended.json()["status"] == "completed" and ended.json()["ended_by"] == "api"
    completed = await next_event(sub)
    assert completed["event_type"] == "call.completed"
    assert completed["payload"]["status"] == "completed"  # type: ignore[index]
    command = orjson.loads((await control.next_msg(timeout=5)).data)
    assert command == {"action": "hangup", "call_id": call["id"]}
    # Hanging up an ended call changes nothing and publishes nothing.
    again = await client.delete(f"/v1/calls/{call['id']}", headers=h)
    assert again.json() == ended.json()
    listed = await client.get("/v1/calls", headers=h, params={"status": "completed"})
    assert [c["id"] for c in listed.json()["calls"]] == [call["id"]]
    assert (await client.get("/v1/calls", headers=h, params={"status": "in_progress"})).json() == {
        "calls": []
    }
    with pytest.raises(nats.errors.TimeoutError):
        await sub.next_msg(timeout=0.3)


async def test_messages_and_mode_changes(
    client: httpx.AsyncClient, workspace: Workspace, bus: Client
) -> None:
    h = workspace.headers
    sub = await bus.subscribe(f"vb.{workspace.id}.conversation.*.events")
    first = await client.post(
        "/v1/messages",
        headers=h,
        json={
            "channel": "whatsapp",
            "to_number": "+447700900123",
            "from_number": "+14155550199",
            "text": "Your order shipped",
        },
    )
    assert first.status_code == 201, first.text
    message = first.json()
    conversation_id = message["conversation_id"]
    sent = await next_event(sub)
    assert sent["event_type"] == "message.sent" and sent["channel"] == "whatsapp"
    assert sent["payload"] == {
        "message_id": message["id"],
        "direction": "outbound",
        "text": "Your order shipped",
        "status": "sent",
    }
    # Same numbers and channel: the same conversation; or by conversation_id.
    second = await client.post(
        "/v1/messages",
        headers=h,
        json={
            "channel": "whatsapp",
            "to_number": "+447700900123",
            "from_number": "+14155550199",
            "text": "Tracking: 123",
        },
    )
    third = await client.post(
        "/v1/messages", headers=h, json={"conversation_id": conversation_id, "text": "Thanks!"}
    )
    assert second.json()["conversation_id"] == third.json()["conversation_id"] == conversation_id
    await next_event(sub)
    await next_event(sub)
    detail = (await client.get(f"/v1/conversations/{conversation_id}", headers=h)).json()
    assert [m["text"] for m in detail["messages"]] == [
        "Your order shipped",
        "Tracking: 123",
        "Thanks!",
    ]
    assert detail["ai_mode"] == "ai" and detail["channel"] == "whatsapp"
    paged = (
        await client.get(
            f"/v1/conversations/{conversation_id}/messages", headers=h, params={"page_size": 2}
        )
    ).json()
    assert [m["text"] for m in paged["messages"]] == ["Thanks!", "Tracking: 123"]
    assert "next_page_token" in paged

    changed = await client.patch(
        f"/v1/conversations/{conversation_id}",
        headers=h,
        json={"ai_mode": "human", "actor_user_id": "usr_7"},
    )
    assert changed.status_code == 200
    assert changed.json()["changed"] is True and changed.json()["ai_mode"] == "human"
    event = await next_event(sub)
    assert event["event_type"] == "conversation.mode_changed"
    assert event["payload"] == {"from_mode": "ai", "to_mode": "human", "actor_user_id": "usr_7"}
    same = await client.patch(
        f"/v1/conversations/{conversation_id}", headers=h, json={"ai_mode": "human"}
    )
    assert same.json()["changed"] is False
    closed = await client.patch(
        f"/v1/conversations/{conversation_id}", headers=h, json={"ai_mode": "closed"}
    )
    assert closed.json()["changed"] is True
    # The no-op published nothing: the next event is the real change.
    following = await next_event(sub)
    assert following["payload"]["from_mode"] == "human"  # type: ignore[index]
    assert following["payload"]["to_mode"] == "closed"  # type: ignore[index]
    listed = await client.get("/v1/conversations", headers=h, params={"ai_mode": "closed"})
    assert [c["id"] for c in listed.json()["conversations"]] == [conversation_id]


async def test_bad_input_is_400_naming_the_field_and_changes_nothing(
    client: httpx.AsyncClient, workspace: Workspace
) -> None:
    h = workspace.headers
    good = {"to_number": "+14155550100", "from_number": "+14155550101"}
    assert_invalid(
        await client.post("/v1/calls", headers=h, json={"from_number": "+14155550101"}), "to_number"
    )
    assert_invalid(
        await client.post("/v1/calls", headers=h, json={**good, "to_number": "555-1234"}), "E.164"
    )
    assert_invalid(
        await client.post("/v1/calls", headers=h, json={**good, "transport": "pstn"}), "transport"
    )
    assert_invalid(
        await client.post("/v1/calls", headers=h, json={**good, "colour": "red"}), "colour"
    )
    assert_invalid(
        await client.post("/v1/calls", headers=h, json={**good, "agent_id": "nope"}), "agent_id"
    )
    assert_invalid(await client.post("/v1/calls", headers=h, content=b"{not json"), "JSON")
    assert_invalid(await client.post("/v1/calls", headers=h, json=["a list"]), "body")
    assert_invalid(await client.get("/v1/calls", headers=h, params={"page_size": 0}), "page_size")
    assert_invalid(await client.get("/v1/calls", headers=h, params={"page_size": 101}), "page_size")
    assert_invalid(
        await client.get("/v1/calls", headers=h, params={"page_token": "garbage"}), "page_token"
    )
    assert_invalid(await client.get("/v1/calls", headers=h, params={"status": "ringing"}), "status")
    assert_invalid(await client.get("/v1/calls/not-a-call-id", headers=h), "call_id")
    assert_invalid(await client.post("/v1/keys", headers=h, json={"mode": "prod"}), "mode")
    assert_invalid(await client.post("/v1/agents", headers=h, json={"name": ""}), "name")
    assert_invalid(
        await client.post("/v1/messages", headers=h, json={"text": "hi"}), "conversation_id"
    )
    assert_invalid(
        await client.post(
            "/v1/messages", headers=h, json={"text": "", "conversation_id": "conv_0000000000000000"}
        ),
        "text",
    )
    # A page token from one list is refused by another.
    for i in range(3):
        await client.post("/v1/agents", headers=h, json={"name": f"a{i}"})
    token = (await client.get("/v1/agents", headers=h, params={"page_size": 1})).json()[
        "next_page_token"
    ]
    assert_invalid(
        await client.get("/v1/calls", headers=h, params={"page_token": token}), "page_token"
    )
    # Nothing was created by any of the above.
    assert (await client.get("/v1/calls", headers=h)).json() == {"calls": []}
    assert (await client.get("/v1/conversations", headers=h)).json() == {"conversations": []}
    # Unknown ids in bodies are NOT_FOUND, naming the field.
    missing = await client.post(
        "/v1/calls", headers=h, json={**good, "agent_id": "agt_0000000000000000"}
    )
    assert missing.status_code == 404 and "agent_id" in missing.json()["message"]


async def test_body_without_content_type_is_read_as_json(
    client: httpx.AsyncClient, workspace: Workspace
) -> None:
    response = await client.post(
        "/v1/agents", headers=workspace.headers, content=b'{"name": "curl"}'
    )
    assert response.status_code == 201, response.text


async def test_health_readiness_and_openapi(
    client: httpx.AsyncClient, server: ServerThread
) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"postgres": "ok", "nats": "ok"}
    schema = (await client.get("/openapi.json")).json()
    documented = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    for method, path, _params in routes(server.app):
        # The console and its icon are pages, not API.
        if path not in ("/openapi.json", "/docs", "/", "/favicon.ico") and method != "WS":
            assert (method, path) in documented, (method, path)
    assert schema["paths"]["/v1/calls"]["post"]["security"] == [{"bearer": []}]
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "/v1/calls/{call_id}" in docs.text
    assert "cdn" not in docs.text.lower()


async def test_unknown_method_is_a_404_envelope(
    client: httpx.AsyncClient, workspace: Workspace
) -> None:
    response = await client.put("/v1/workspace", headers=workspace.headers)
    assert response.status_code == 404
    assert response.json()["error_code"] == "NOT_FOUND"


async def test_concurrent_mode_changes_publish_one_event_each_and_agree(
    client: httpx.AsyncClient, workspace: Workspace, bus: Client
) -> None:
    """The row lock makes concurrent PATCHes serial: every published from_mode is the mode the
    previous change left, so the history is a chain."""
    h = workspace.headers
    message = await client.post(
        "/v1/messages",
        headers=h,
        json={
            "channel": "sms",
            "to_number": "+14155550111",
            "from_number": "+14155550112",
            "text": "x",
        },
    )
    conversation_id = message.json()["conversation_id"]
    sub = await bus.subscribe(f"vb.{workspace.id}.conversation.{conversation_id}.events")
    modes = ["human", "ai", "closed", "human", "ai", "human"]
    results = await asyncio.gather(
        *(
            client.patch(f"/v1/conversations/{conversation_id}", headers=h, json={"ai_mode": m})
            for m in modes
        )
    )
    changes = sum(1 for r in results if r.json()["changed"])
    # The message's own event is relayed after its commit, so it may arrive after the subscribe.
    events: list[dict[str, object]] = []
    while len(events) < changes:
        event = await next_event(sub)
        if event["event_type"] == "conversation.mode_changed":
            events.append(event)
    chain = ["ai"]
    for event in events:
        payload = event["payload"]
        assert payload["from_mode"] == chain[-1]  # type: ignore[index]
        chain.append(payload["to_mode"])  # type: ignore[index]
    final = (await client.get(f"/v1/conversations/{conversation_id}", headers=h)).json()
    assert final["ai_mode"] == chain[-1]
