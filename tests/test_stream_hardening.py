"""Issue 9 on a real server: a client that stops reading is cut off and freed (SPEC 6), commands
from one socket are rate-limited, and a call's end or start that the bus holds but the recorder
has not written yet is honoured by the streams (no recorder runs for these workspaces)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import psutil
import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from switchboard.client.sse import sse_events
from switchboard.events import (
    EVENTS_STREAM,
    call_events_subject,
    call_transcript_subject,
    make_envelope,
)
from switchboard.ids import new_id
from switchboard.producer import Producer
from tests.harness import ServerThread, Workspace, eventually
from tests.test_stream_lifecycle import stalled_reader
from tests.test_streams import new_call, next_event, turn, ws_url

WAIT = 10.0
HEARTBEAT = 0.5  # so a stall is declared after one second
BIG = "word " * 3000  # ~15 KB a frame: a reader that stops fills the socket buffers quickly


@pytest.fixture(scope="module")
def quick_server(make_server: Callable[..., ServerThread]) -> ServerThread:
    return make_server(heartbeat_interval=HEARTBEAT)


def port_of(server: ServerThread) -> int:
    return int(server.url.rsplit(":", 1)[1])


def server_holds_socket(server: ServerThread, client: socket.socket) -> bool:
    """Whether this process (the server runs in a thread of it) still has the server's end of
    the client's connection open: closed means the connection was let go, not only our state."""
    client_port = client.getsockname()[1]
    return any(
        c.laddr.port == port_of(server) and c.raddr and c.raddr.port == client_port
        for c in psutil.Process().net_connections(kind="tcp")
    )


def stalled_websocket(server: ServerThread, call_id: str, key: str) -> socket.socket:
    """A WebSocket client that completes the upgrade and then never reads again."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(WAIT)
    raw.connect(("127.0.0.1", port_of(server)))
    raw.sendall(
        (
            f"GET /v1/calls/{call_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {key}\r\n\r\n"
        ).encode()
    )
    received = b""
    while b"\r\n\r\n" not in received:
        received += raw.recv(1)  # byte by byte: nothing past the handshake is read
    assert received.startswith(b"HTTP/1.1 101"), received
    return raw


async def publish_until_freed(
    server: ServerThread, bus: Client, subject: str, frame: bytes, kind: str
) -> None:
    """Publishes large frames for the stalled stream (at most ~9 MB) until the server has let
    go of it, then waits for it to do so."""
    services = server.services
    assert services is not None

    def freed() -> bool:
        return bool(server.call(lambda: not services.registry.streams))

    for _ in range(60):
        for _ in range(10):
            await bus.publish(subject, frame)
        await bus.flush()
        if freed():
            break
    await eventually(freed, within=WAIT)
    await eventually(lambda: server.call(services.hub.subscription_count) == 0)
    assert server.call(lambda: services.metrics.open_streams[kind]) == 0


async def stalled_count(server: ServerThread, kind: str) -> int:
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
        text = (await client.get("/metrics")).text
    line = f'switchboard_streams_stalled_total{{kind="{kind}"}} '
    found = [x for x in text.splitlines() if x.startswith(line)]
    return int(found[0].split()[-1]) if found else 0


# --- a client that stops reading (SPEC 6: two heartbeat intervals) ---------------------------


async def test_a_transcript_client_that_stops_reading_is_cut_off_and_freed(
    quick_server: ServerThread, workspace: Workspace, bus: Client
) -> None:
    server = quick_server
    services = server.services
    assert services is not None
    subject = ""
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
        call_id = await new_call(client, workspace)
        path = f"/v1/calls/{call_id}/transcript/stream"
        subject = call_transcript_subject(workspace.id, call_id)
        stalls_before = await stalled_count(server, "transcript_sse")

        async def read_until_the_last() -> None:
            # A client of the same call that keeps reading is not affected.
            async with client.stream("GET", path, headers=workspace.headers) as response:
                assert response.status_code == 200
                async for event in sse_events(response):
                    if event.data and orjson.loads(event.data)["text"] == "the last":
                        return

        reading = asyncio.create_task(read_until_the_last())
        await eventually(lambda: server.call(lambda: len(services.registry.streams)) == 1)
        stalled = stalled_reader(server, path, workspace.key)
        try:
            await eventually(lambda: server.call(lambda: len(services.registry.streams)) == 2)
            frame = turn(BIG, False)
            for _ in range(60):
                for _ in range(10):
                    await bus.publish(subject, frame)
                await bus.flush()
                if server.call(lambda: len(services.registry.streams)) == 1:
                    break
            await eventually(lambda: server.call(lambda: len(services.registry.streams)) == 1)
            await eventually(lambda: not server_holds_socket(server, stalled))
            assert server.call(lambda: services.metrics.open_streams["transcript_sse"]) == 1
            assert await stalled_count(server, "transcript_sse") == stalls_before + 1
            await bus.publish(subject, turn("the last", True))
            await asyncio.wait_for(reading, WAIT)
        finally:
            stalled.close()
            reading.cancel()
    # With the reader gone too, nothing of either stream is left.
    await eventually(lambda: server.call(services.hub.subscription_count) == 0)
    assert server.call(lambda: services.metrics.open_streams["transcript_sse"]) == 0


async def test_a_websocket_client_that_stops_reading_is_cut_off_and_freed(
    quick_server: ServerThread, workspace: Workspace, bus: Client
) -> None:
    server = quick_server
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
        call_id = await new_call(client, workspace)
    stalled = stalled_websocket(server, call_id, workspace.key)
    try:
        services = server.services
        assert services is not None
        await eventually(lambda: server.call(lambda: len(services.registry.streams)) == 1)
        stalls_before = await stalled_count(server, "call_websocket")
        envelope = make_envelope(
            "call.agent_response",
            workspace_id=workspace.id,
            channel="voice",
            call_id=call_id,
            payload={"turn_id": "trn_0000000000000001", "text": BIG},
        )
        await publish_until_freed(
            server,
            bus,
            call_events_subject(workspace.id, call_id),
            orjson.dumps(envelope),
            "call_websocket",
        )
        await eventually(lambda: not server_holds_socket(server, stalled))
        assert await stalled_count(server, "call_websocket") == stalls_before + 1
    finally:
        stalled.close()


# --- commands are rate-limited per socket ----------------------------------------------------


async def test_commands_beyond_the_rate_get_rate_limited_and_the_socket_stays_open(
    server: ServerThread, client: httpx.AsyncClient, workspace: Workspace, bus: Client
) -> None:
    call_id = await new_call(client, workspace)
    results: list[dict[str, Any]] = []
    async with ws_connect(ws_url(server, call_id), additional_headers=workspace.headers) as peer:
        # One command at a time, each answered before the next (no media plane: at once), so
        # only the rate can refuse them, never the limit on commands in flight.
        for n in range(40):
            await peer.send(
                orjson.dumps({"action": "send_dtmf", "digits": "1", "request_id": f"r{n}"}).decode()
            )
            while True:
                message = orjson.loads(await asyncio.wait_for(peer.recv(), WAIT))
                if message["event_type"] == "command.result":
                    results.append(message)
                    break
        assert [r["request_id"] for r in results] == [f"r{n}" for n in range(40)]
        assert all(r["ok"] is False for r in results)
        codes = [r["error_code"] for r in results]
        assert codes[:20] == ["UNAVAILABLE"] * 20  # the burst passes to the media plane
        assert codes.count("RATE_LIMITED") >= 10
        # Refused, never dropped: the socket still carries the call's events.
        await bus.publish(
            call_events_subject(workspace.id, call_id),
            orjson.dumps(
                make_envelope(
                    "call.barge_in",
                    workspace_id=workspace.id,
                    channel="voice",
                    call_id=call_id,
                    payload={"turn_id": "trn_0000000000000001", "interrupted_text": "x"},
                )
            ),
        )
        while (event := orjson.loads(await asyncio.wait_for(peer.recv(), WAIT)))[
            "event_type"
        ] != "call.barge_in":
            pass
        assert event["call_id"] == call_id
    text = (await client.get("/metrics")).text
    assert 'switchboard_commands_refused_total{limit="rate"}' in text


# --- a call's start and end, from the bus before the recorder (issue 9, item 9) ---------------


async def test_a_transcript_stream_after_the_stored_end_gets_204_before_the_recorder(
    client: httpx.AsyncClient, workspace: Workspace, bus: Client
) -> None:
    """The row still says in_progress (no recorder runs), but `call.completed` is stored."""
    call_id = await new_call(client, workspace)
    # The API's call.initiated reaches the bus through the outbox relay, just after the 201; a
    # media plane ends a call it has heard of.
    subject = call_events_subject(workspace.id, call_id)
    js = bus.jetstream()

    async def initiated_stored() -> bool:
        try:
            await js.get_last_msg(EVENTS_STREAM, subject)
        except NotFoundError:
            return False
        return True

    await eventually(initiated_stored)
    await Producer(bus).event(
        "call.completed",
        workspace_id=workspace.id,
        call_id=call_id,
        payload={"status": "completed", "duration_seconds": 3.5, "ended_by": "user"},
    )
    assert (await client.get(f"/v1/calls/{call_id}", headers=workspace.headers)).json()[
        "status"
    ] == "in_progress"
    async with client.stream(
        "GET", f"/v1/calls/{call_id}/transcript/stream", headers=workspace.headers
    ) as response:
        assert response.status_code == 204


async def test_a_call_only_the_bus_knows_is_streamed_not_404(
    server: ServerThread, client: httpx.AsyncClient, workspace: Workspace, bus: Client
) -> None:
    producer = Producer(bus)
    call_id = new_id("call")
    initiated = await producer.event(
        "call.initiated",
        workspace_id=workspace.id,
        call_id=call_id,
        payload={
            "direction": "inbound",
            "from_number": "+14155550123",
            "to_number": "+14155550000",
            "transport": "sip",
        },
    )
    assert (await client.get(f"/v1/calls/{call_id}", headers=workspace.headers)).status_code == 404
    path = f"/v1/calls/{call_id}/transcript/stream"
    async with (
        client.stream("GET", path, headers=workspace.headers) as response,
        ws_connect(ws_url(server, call_id), additional_headers=workspace.headers) as peer,
    ):
        assert response.status_code == 200
        events = sse_events(response)
        await next_event(events)  # retry hint
        first = orjson.loads(await asyncio.wait_for(peer.recv(), WAIT))
        assert first["event_id"] == initiated["event_id"]
        completed = await producer.event(
            "call.completed",
            workspace_id=workspace.id,
            call_id=call_id,
            payload={"status": "completed", "duration_seconds": 1.0, "ended_by": "agent"},
        )
        end = await next_event(events)
        assert end.event == "end"
        assert orjson.loads(await asyncio.wait_for(peer.recv(), WAIT)) == completed
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(peer.recv(), WAIT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    # Ended on the bus, still unknown to the database: 204, as for any ended call.
    assert (await client.get(path, headers=workspace.headers)).status_code == 204
    # A call the bus has never seen is still a 404.
    missing = await client.get(
        f"/v1/calls/{new_id('call')}/transcript/stream", headers=workspace.headers
    )
    assert missing.status_code == 404
