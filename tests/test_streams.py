"""SPEC sections 5 and 6 on a real server, real NATS and real clients: the three streams."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from nats.aio.client import Client
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from switchboard.client.sse import SseEvent, sse_events
from switchboard.events import (
    call_control_subject,
    call_events_subject,
    call_transcript_subject,
    make_envelope,
)
from switchboard.ids import iso_ms, utc_now
from tests.harness import ServerThread, Workspace

WAIT = 5.0


async def new_call(client: httpx.AsyncClient, workspace: Workspace, transport: str = "sip") -> str:
    response = await client.post(
        "/v1/calls",
        headers=workspace.headers,
        json={"to_number": "+14155550100", "from_number": "+14155550101", "transport": transport},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def turn(
    text: str, final: bool, turn_id: str = "trn_0000000000000001", role: str = "user"
) -> bytes:
    return orjson.dumps(
        {"role": role, "text": text, "is_final": final, "turn_id": turn_id, "ts": iso_ms(utc_now())}
    )


def event(workspace: Workspace, call_id: str, event_type: str, payload: dict[str, Any]) -> bytes:
    return orjson.dumps(
        make_envelope(
            event_type, workspace_id=workspace.id, channel="voice", call_id=call_id, payload=payload
        )
    )


async def next_event(events: AsyncIterator[SseEvent], skip_comments: bool = True) -> SseEvent:
    while True:
        item = await asyncio.wait_for(anext(events), WAIT)
        if not (skip_comments and item.comment is not None):
            return item


def ws_url(server: ServerThread, call_id: str) -> str:
    return server.url.replace("http://", "ws://") + f"/v1/calls/{call_id}/stream"


# --- 5.1 transcript SSE ---------------------------------------------------------------------


async def test_transcript_stream_frames_headers_and_end(
    client: httpx.AsyncClient, workspace: Workspace, bus: Client
) -> None:
    call_id = await new_call(client, workspace)
    url = f"/v1/calls/{call_id}/transcript/stream"
    async with client.stream("GET", url, headers=workspace.headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["x-request-id"].startswith("req_")
        events = sse_events(response)
        first = await next_event(events)
        assert first.retry is not None and first.data is None
        subject = call_transcript_subject(workspace.id, call_id)
        await bus.publish(subject, turn("Hello", False))
        await bus.publish(subject, turn("Hello, I need help", True))
        partial, final = await next_event(events), await next_event(events)
        assert partial.event is None and final.event is None
        assert orjson.loads(partial.data or "") == {
            **orjson.loads(turn("Hello", False)),
            "ts": orjson.loads(partial.data or "")["ts"],
        }
        assert orjson.loads(final.data or "")["is_final"] is True
        # Cursors: opaque to clients, the turns' sequences in the transcript stream here.
        assert (final.id or "").startswith("t") and (partial.id or "").startswith("t")
        assert int((final.id or "t0")[1:]) > int((partial.id or "t0")[1:])
        # The call ends: `event: end`, then the server closes the stream.
        assert (
            await client.delete(f"/v1/calls/{call_id}", headers=workspace.headers)
        ).status_code == 200
        end = await next_event(events)
        assert end.event == "end" and orjson.loads(end.data or "") == {"reason": "call_completed"}
        with pytest.raises(StopAsyncIteration):
            await next_event(events)
    # An ended call is a 204, so EventSource stops reconnecting.
    again = await client.get(url, headers=workspace.headers)
    assert again.status_code == 204 and again.content == b""


async def test_heartbeat_comment_at_the_configured_interval(
    make_server: Callable[..., ServerThread], workspace: Workspace
) -> None:
    server = make_server(heartbeat_interval=0.3)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        call_id = await new_call(client, workspace)
        async with client.stream(
            "GET", f"/v1/calls/{call_id}/transcript/stream", headers=workspace.headers
        ) as response:
            events = sse_events(response)
            await next_event(events)  # retry
            beat = await next_event(events, skip_comments=False)
            assert beat.comment == "keep-alive"
        metrics = (await client.get("/metrics")).text
    assert 'switchboard_heartbeats_total{kind="transcript_sse"}' in metrics


# --- isolation and tokens -------------------------------------------------------------------


async def test_another_workspaces_call_or_conversation_is_404_on_all_three_streams(
    client: httpx.AsyncClient,
    server: ServerThread,
    workspace: Workspace,
    other_workspace: Workspace,
) -> None:
    call_id = await new_call(client, workspace)
    message = await client.post(
        "/v1/messages",
        headers=workspace.headers,
        json={
            "channel": "sms",
            "to_number": "+14155550130",
            "from_number": "+14155550131",
            "text": "x",
        },
    )
    conversation_id = message.json()["conversation_id"]
    for path in (
        f"/v1/calls/{call_id}/transcript/stream",
        f"/v1/conversations/{conversation_id}/stream",
    ):
        response = await client.get(path, headers=other_workspace.headers)
        assert response.status_code == 404 and response.json()["error_code"] == "NOT_FOUND"
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(ws_url(server, call_id), additional_headers=other_workspace.headers):
            pass
    assert refused.value.response.status_code == 404
    assert orjson.loads(refused.value.response.body or b"")["error_code"] == "NOT_FOUND"
    with pytest.raises(InvalidStatus) as unauthenticated:
        async with ws_connect(ws_url(server, call_id)):
            pass
    assert unauthenticated.value.response.status_code == 401
    # Nothing was left subscribed by the refusals.
    assert server.call(server.services.hub.subscription_count) == 0  # type: ignore[union-attr]


async def test_query_token_policy_on_the_streams_and_stream_tokens(
    client: httpx.AsyncClient, server: ServerThread, workspace: Workspace
) -> None:
    call_a, call_b = await new_call(client, workspace), await new_call(client, workspace)
    message = await client.post(
        "/v1/messages",
        headers=workspace.headers,
        json={
            "channel": "sms",
            "to_number": "+14155550132",
            "from_number": "+14155550133",
            "text": "x",
        },
    )
    conversation = f"/v1/conversations/{message.json()['conversation_id']}/stream"
    refused = await client.get(
        conversation, params={"token": workspace.key}, headers=workspace.headers
    )
    assert refused.status_code == 401 and "Authorization header" in refused.json()["message"]
    # The key itself as ?token= works on both call paths.
    async with client.stream(
        "GET", f"/v1/calls/{call_a}/transcript/stream", params={"token": workspace.key}
    ) as response:
        assert response.status_code == 200
    async with ws_connect(ws_url(server, call_a) + f"?token={workspace.key}") as socket_a:
        assert socket_a.response is not None and socket_a.response.status_code == 101
    # A stream token opens its call only, only as ?token=.
    issued = await client.post(
        "/v1/stream-tokens", headers=workspace.headers, json={"call_id": call_a, "ttl_seconds": 60}
    )
    assert issued.status_code == 201
    token = issued.json()["token"]
    assert token.startswith("st_") and issued.json()["expires_at"].endswith("Z")
    async with client.stream(
        "GET", f"/v1/calls/{call_a}/transcript/stream", params={"token": token}
    ) as response:
        assert response.status_code == 200
    async with ws_connect(ws_url(server, call_a) + f"?token={token}"):
        pass
    other = await client.get(f"/v1/calls/{call_b}/transcript/stream", params={"token": token})
    assert other.status_code == 401 and "another call" in other.json()["message"]
    with pytest.raises(InvalidStatus) as wrong_call:
        async with ws_connect(ws_url(server, call_b) + f"?token={token}"):
            pass
    assert wrong_call.value.response.status_code == 401
    as_header = await client.get(
        f"/v1/calls/{call_a}", headers={"Authorization": f"Bearer {token}"}
    )
    assert as_header.status_code == 401
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert (
        await client.get(f"/v1/calls/{call_a}/transcript/stream", params={"token": forged})
    ).status_code == 401
    bad_ttl = await client.post(
        "/v1/stream-tokens",
        headers=workspace.headers,
        json={"call_id": call_a, "ttl_seconds": 99999},
    )
    assert bad_ttl.status_code == 400 and "ttl_seconds" in bad_ttl.json()["message"]


# --- 5.2 conversation SSE -------------------------------------------------------------------


async def test_conversation_stream_carries_envelopes(
    client: httpx.AsyncClient, workspace: Workspace
) -> None:
    h = workspace.headers
    first = await client.post(
        "/v1/messages",
        headers=h,
        json={
            "channel": "whatsapp",
            "to_number": "+447700900200",
            "from_number": "+14155550134",
            "text": "one",
        },
    )
    conversation_id = first.json()["conversation_id"]
    async with client.stream(
        "GET", f"/v1/conversations/{conversation_id}/stream", headers=h
    ) as response:
        assert response.status_code == 200
        events = sse_events(response)
        await next_event(events)  # retry
        await client.post(
            "/v1/messages", headers=h, json={"conversation_id": conversation_id, "text": "two"}
        )
        await client.patch(
            f"/v1/conversations/{conversation_id}", headers=h, json={"ai_mode": "human"}
        )
        # The first message's own event is relayed after its commit, so it may still arrive.
        sent = await next_event(events)
        if orjson.loads(sent.data or "")["payload"].get("text") == "one":
            sent = await next_event(events)
        changed = await next_event(events)
        sent_envelope, changed_envelope = (
            orjson.loads(sent.data or ""),
            orjson.loads(changed.data or ""),
        )
        assert sent.event is None and sent.id is not None
        assert (
            sent_envelope["event_type"] == "message.sent"
            and sent_envelope["payload"]["text"] == "two"
        )
        assert changed_envelope["event_type"] == "conversation.mode_changed"
        assert changed_envelope["payload"]["to_mode"] == "human"
        assert int((changed.id or "e0")[1:]) > int((sent.id or "e0")[1:])


# --- 5.3 WebSocket --------------------------------------------------------------------------


async def test_websocket_envelopes_dtmf_and_close_codes(
    client: httpx.AsyncClient, server: ServerThread, workspace: Workspace, bus: Client
) -> None:
    call_id = await new_call(client, workspace, transport="esl")

    async def media_plane(msg: Any) -> None:
        command = orjson.loads(msg.data)
        await msg.respond(orjson.dumps({"ok": True}))
        await bus.publish(
            call_events_subject(workspace.id, call_id),
            event(
                workspace,
                call_id,
                "call.dtmf_sent",
                {"digits": command["digits"], "request_id": command["request_id"]},
            ),
        )

    async with (
        ws_connect(ws_url(server, call_id), additional_headers=workspace.headers) as sender,
        ws_connect(ws_url(server, call_id), additional_headers=workspace.headers) as watcher,
    ):
        # Both first get the call's history: here, the call.initiated the API published
        # before either socket could have found the call.
        for peer in (sender, watcher):
            first = orjson.loads(await asyncio.wait_for(peer.recv(), WAIT))
            assert first["event_type"] == "call.initiated" and first["call_id"] == call_id
        # No media plane answers yet: a prompt UNAVAILABLE, never a hang.
        await sender.send(
            orjson.dumps({"action": "send_dtmf", "digits": "1", "request_id": "r0"}).decode()
        )
        result = orjson.loads(await asyncio.wait_for(sender.recv(), WAIT))
        assert result == {
            **result,
            "event_type": "command.result",
            "request_id": "r0",
            "ok": False,
            "error_code": "UNAVAILABLE",
        }

        plane = await bus.subscribe(call_control_subject(workspace.id, call_id), cb=media_plane)
        await bus.flush()
        await sender.send(
            orjson.dumps({"action": "send_dtmf", "digits": "12#", "request_id": "r1"}).decode()
        )
        result = orjson.loads(await asyncio.wait_for(sender.recv(), WAIT))
        assert result == {"event_type": "command.result", "request_id": "r1", "ok": True}
        for peer in (sender, watcher):
            sent = orjson.loads(await asyncio.wait_for(peer.recv(), WAIT))
            assert sent["event_type"] == "call.dtmf_sent" and sent["payload"]["digits"] == "12#"

        # Malformed messages get a command.result error; the connection stays open.
        for bad, code in (
            ("not json", None),
            ('{"action": "send_dtmf", "digits": "9x", "request_id": "r2"}', "r2"),
            ('{"action": "dance", "request_id": "r3"}', "r3"),
        ):
            await sender.send(bad)
            reply = orjson.loads(await asyncio.wait_for(sender.recv(), WAIT))
            assert (
                reply["ok"] is False
                and reply["error_code"] == "INVALID_ARGUMENT"
                and reply["request_id"] == code
            )

        # Events published for the call reach both; call.completed is last, then close 1000.
        await bus.publish(
            call_events_subject(workspace.id, call_id),
            event(
                workspace,
                call_id,
                "call.barge_in",
                {"turn_id": "trn_1", "interrupted_text": "I was"},
            ),
        )
        for peer in (sender, watcher):
            assert (
                orjson.loads(await asyncio.wait_for(peer.recv(), WAIT))["event_type"]
                == "call.barge_in"
            )
        assert (
            await client.delete(f"/v1/calls/{call_id}", headers=workspace.headers)
        ).status_code == 200
        for peer in (sender, watcher):
            assert (
                orjson.loads(await asyncio.wait_for(peer.recv(), WAIT))["event_type"]
                == "call.completed"
            )
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(peer.recv(), WAIT)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
        await plane.unsubscribe()


async def test_websocket_binary_and_oversized_messages_close_with_their_codes(
    client: httpx.AsyncClient, server: ServerThread, workspace: Workspace
) -> None:
    call_id = await new_call(client, workspace)
    for payload, code in ((b"\x00\x01", 1003), ("x" * 20_000, 1009)):
        async with ws_connect(
            ws_url(server, call_id), additional_headers=workspace.headers, max_size=None
        ) as peer:
            assert orjson.loads(await peer.recv())["event_type"] == "call.initiated"
            await peer.send(payload)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(peer.recv(), WAIT)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == code


def test_websocket_peer_that_never_answers_pings_is_closed(
    make_server: Callable[..., ServerThread], workspace: Workspace
) -> None:
    server = make_server(heartbeat_interval=0.3)
    call_id = httpx.post(
        f"{server.url}/v1/calls",
        headers=workspace.headers,
        json={"to_number": "+14155550100", "from_number": "+14155550101"},
    ).json()["id"]
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(
            (
                f"GET /v1/calls/{call_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Upgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {workspace.key}\r\n\r\n"
            ).encode()
        )
        received = b""
        while b"\r\n\r\n" not in received:
            received += raw.recv(4096)
        assert received.startswith(b"HTTP/1.1 101")
        # Read (never answering the pings) until the server gives up on us.
        while chunk := raw.recv(4096):
            received += chunk
    frames = list(ws_frames(received.split(b"\r\n\r\n", 1)[1]))
    opcodes = [opcode for opcode, _ in frames]
    assert 0x9 in opcodes, "the server pinged"
    assert opcodes[-1] == 0x8, "the server closed"
    assert int.from_bytes(frames[-1][1][:2], "big") == 1011


def ws_frames(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked frame a server sent."""
    at = 0
    while at + 2 <= len(data):
        opcode, length = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if length == 126:
            length, at = int.from_bytes(data[at : at + 2], "big"), at + 2
        elif length == 127:
            length, at = int.from_bytes(data[at : at + 8], "big"), at + 8
        yield opcode, data[at : at + length]
        at += length


async def test_websocket_to_an_ended_call_replays_its_history_then_closes_1000(
    client: httpx.AsyncClient, server: ServerThread, workspace: Workspace
) -> None:
    call_id = await new_call(client, workspace)
    assert (
        await client.delete(f"/v1/calls/{call_id}", headers=workspace.headers)
    ).status_code == 200
    async with ws_connect(ws_url(server, call_id), additional_headers=workspace.headers) as peer:
        history = [
            orjson.loads(await asyncio.wait_for(peer.recv(), WAIT))["event_type"] for _ in range(2)
        ]
        assert history == ["call.initiated", "call.completed"]
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(peer.recv(), WAIT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
