"""A live stream's connection is taken over by a protocol object of ours and its ASGI call
returns (issue 13, memory per stream; live/sse_connection.py, live/ws_connection.py,
api/handoff.py). On a real server: the stream holds no task, and everything the call held for
the stream's life is still held until the stream ends and released then (its open-stream slot,
hub subscriptions, registry entry, access-log line), whichever way it ends; the WebSocket's
own connection speaks the protocol as the server did (pings, the close handshake, fragments,
the close codes of a broken protocol)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterator

import httpx
import orjson
import pytest
from nats.aio.client import Client
from websockets.asyncio.client import connect as ws_connect

from switchboard.client.sse import sse_events
from switchboard.events import call_events_subject, call_transcript_subject
from switchboard.live.direct import LAST_BYTES_SECONDS
from switchboard.live.history import stored_call
from tests.harness import ServerThread, Workspace, eventually
from tests.test_streams import event, new_call, next_event, turn, ws_frames, ws_url

STREAMS = 30
WAIT = 10.0


class AccessLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def access_lines() -> Iterator[AccessLines]:
    handler = AccessLines()
    logger = logging.getLogger("switchboard.access")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def raw_stream(server: ServerThread, path: str, key: str, version: str = "1.1") -> socket.socket:
    """An SSE request on a plain socket, its response head read."""
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    request = f"GET {path} HTTP/{version}\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}"
    sock.sendall(request.encode() + b"\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head  # uvicorn answers HTTP/1.0 so too
    return sock


async def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """What the socket sends until `marker` has arrived (or the connection ends)."""

    def read() -> bytes:
        received = b""
        while marker not in received:
            piece = sock.recv(65536)
            if not piece:
                break
            received += piece
        return received

    return await asyncio.to_thread(read)


async def test_live_sse_streams_hold_no_task_and_release_everything_when_they_end(
    make_server: Callable[..., ServerThread], workspace: Workspace, bus: Client
) -> None:
    server = make_server()
    services = server.services
    assert services is not None
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
        call_id = await new_call(client, workspace)
        path = f"/v1/calls/{call_id}/transcript/stream"
        baseline = server.task_count()
        sockets = [raw_stream(server, path, workspace.key) for _ in range(STREAMS)]
        await eventually(lambda: server.call(lambda: len(services.registry.streams)) == STREAMS)
        # Each stream used to keep its ASGI call's task (and the call chain under it) alive.
        assert server.task_count() < baseline + STREAMS // 3
        await bus.publish(call_transcript_subject(workspace.id, call_id), turn("live", True))
        for sock in sockets:
            assert b'"text":"live"' in await read_until(sock, b'"text":"live"')
        # Held while they live: the workspace's stream slots and the call's subscriptions.
        book = services.limits.book
        assert server.call(lambda: book.open_streams(workspace.id, 0.0)) == STREAMS
        assert server.call(services.hub.subscription_count) == 2
        for sock in sockets:
            sock.close()
        await eventually(lambda: server.call(lambda: len(services.registry.streams)) == 0)
        await eventually(lambda: server.call(services.hub.subscription_count) == 0)
        await eventually(lambda: server.call(lambda: book.open_streams(workspace.id, 0.0)) == 0)
        assert server.call(lambda: services.metrics.open_streams["transcript_sse"]) == 0


async def test_a_stream_slot_stays_taken_while_the_stream_is_live(
    make_server: Callable[..., ServerThread], workspace: Workspace
) -> None:
    server = make_server(workspace_max_streams=2)
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
        call_id = await new_call(client, workspace)
        path = f"/v1/calls/{call_id}/transcript/stream"
        first = raw_stream(server, path, workspace.key)
        second = raw_stream(server, path, workspace.key)
        refused = await client.get(path, headers=workspace.headers)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error_code"] == "RATE_LIMITED"
        first.close()

        async def admitted() -> bool:
            async with client.stream("GET", path, headers=workspace.headers) as response:
                return response.status_code == 200

        await eventually(admitted)
        second.close()


async def test_the_end_is_written_then_the_connection_closes_and_is_logged_once(
    server: ServerThread,
    client: httpx.AsyncClient,
    workspace: Workspace,
    access_lines: AccessLines,
) -> None:
    call_id = await new_call(client, workspace)
    path = f"/v1/calls/{call_id}/transcript/stream"
    async with client.stream("GET", path, headers=workspace.headers) as response:
        events = sse_events(response)
        await next_event(events)  # retry: live, and taken over
        # The access line of a stream is written when it ends, with its whole duration.
        assert not [line for line in access_lines.lines if path in line]
        assert (
            await client.delete(f"/v1/calls/{call_id}", headers=workspace.headers)
        ).status_code == 200
        end = await next_event(events)
        assert end.event == "end"
        with pytest.raises(StopAsyncIteration):
            await next_event(events)
    await eventually(lambda: [line for line in access_lines.lines if path in line])
    assert [line for line in access_lines.lines if path in line] == [f"GET {path} 200"]


async def test_an_http_1_0_client_gets_its_stream_and_the_end_then_the_close(
    server: ServerThread, client: httpx.AsyncClient, workspace: Workspace, bus: Client
) -> None:
    call_id = await new_call(client, workspace)
    sock = raw_stream(server, f"/v1/calls/{call_id}/transcript/stream", workspace.key, "1.0")
    assert b"retry:" in await read_until(sock, b"retry:")
    await bus.publish(call_transcript_subject(workspace.id, call_id), turn("plain", True))
    assert b'"text":"plain"' in await read_until(sock, b'"text":"plain"')
    assert (await client.delete(f"/v1/calls/{call_id}", headers=workspace.headers)).is_success
    rest = await read_until(sock, b"\x00never")  # read until the server closes
    assert b"event: end\n" in rest
    sock.close()


async def test_a_taken_over_stream_still_gets_heartbeats_and_its_revocation(
    make_server: Callable[..., ServerThread], workspace: Workspace
) -> None:
    server = make_server(heartbeat_interval=0.3)
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
        call_id = await new_call(client, workspace)
        created = await client.post(
            "/v1/keys", headers=workspace.headers, json={"name": "revoked mid-stream"}
        )
        assert created.status_code == 201, created.text
        key = created.json()
        sock = raw_stream(server, f"/v1/calls/{call_id}/transcript/stream", key["api_key"])
        assert b": keep-alive" in await read_until(sock, b": keep-alive")
        revoked = await client.delete(f"/v1/keys/{key['id']}", headers=workspace.headers)
        assert revoked.is_success, revoked.text
        rest = await read_until(sock, b"\x00never")
        assert b"event: error" in rest and b"revoked" in rest
        assert rest.endswith(b"0\r\n\r\n")  # the chunked body ends, then the connection
        sock.close()


# --- the call WebSocket ------------------------------------------------------------------------


def raw_websocket(
    server: ServerThread, call_id: str, key: str, receive_buffer: int | None = None
) -> socket.socket:
    """A WebSocket on a plain socket, past its handshake, so a test can send what no client
    library would (or read nothing)."""
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(WAIT)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        (
            f"GET /v1/calls/{call_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {key}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_live_websockets_hold_no_task_and_release_everything_when_they_end(
    make_server: Callable[..., ServerThread], workspace: Workspace, bus: Client
) -> None:
    server = make_server()
    services = server.services
    assert services is not None
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
        call_id = await new_call(client, workspace)
    baseline = server.task_count()
    peers = [
        await ws_connect(ws_url(server, call_id), additional_headers=workspace.headers)
        for _ in range(STREAMS)
    ]
    for peer in peers:  # the replay: call.initiated
        assert orjson.loads(await asyncio.wait_for(peer.recv(), WAIT))["event_type"] == (
            "call.initiated"
        )
    # Each socket used to keep its ASGI call's task, a writer task and the server's own.
    assert server.task_count() < baseline + STREAMS // 3
    payload = {"turn_id": "trn_1", "interrupted_text": "wait"}
    envelope = event(workspace, call_id, "call.barge_in", payload)
    await bus.publish(call_events_subject(workspace.id, call_id), envelope)
    for peer in peers:
        assert orjson.loads(await asyncio.wait_for(peer.recv(), WAIT))["event_type"] == (
            "call.barge_in"
        )
    book = services.limits.book
    assert server.call(lambda: book.open_streams(workspace.id, 0.0)) == STREAMS
    for peer in peers:
        await peer.close()
    await eventually(lambda: server.call(lambda: len(services.registry.streams)) == 0)
    await eventually(lambda: server.call(services.hub.subscription_count) == 0)
    await eventually(lambda: server.call(lambda: book.open_streams(workspace.id, 0.0)) == 0)
    assert server.call(lambda: services.metrics.open_streams["call_websocket"]) == 0


async def test_pings_are_answered_and_a_close_is_echoed_then_released(
    server: ServerThread, client: httpx.AsyncClient, workspace: Workspace
) -> None:
    services = server.services
    assert services is not None
    call_id = await new_call(client, workspace)
    peer = await ws_connect(ws_url(server, call_id), additional_headers=workspace.headers)
    await asyncio.wait_for(peer.recv(), WAIT)  # call.initiated
    pong = await peer.ping(b"are you there")
    await asyncio.wait_for(pong, WAIT)
    await peer.close(4000, "done here")
    assert peer.protocol.close_rcvd is not None and peer.protocol.close_rcvd.code == 4000


async def test_a_fragmented_command_is_read_whole_and_answered(
    server: ServerThread, client: httpx.AsyncClient, workspace: Workspace
) -> None:
    call_id = await new_call(client, workspace)
    async with ws_connect(ws_url(server, call_id), additional_headers=workspace.headers) as peer:
        await asyncio.wait_for(peer.recv(), WAIT)  # call.initiated
        await peer.send(['{"action": "send_dtmf", ', '"digits": "12", "request_id": "frag"}'])
        result = orjson.loads(await asyncio.wait_for(peer.recv(), WAIT))
        assert result["event_type"] == "command.result" and result["request_id"] == "frag"
        assert result["error_code"] == "UNAVAILABLE"  # no media plane runs for this call


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (bytes((0x81, 0x82)) + b"\x00\x00\x00\x00\xff\xfe", 1007),  # text that is not UTF-8
        (bytes((0x81, 0x02)) + b"hi", 1002),  # an unmasked client frame
    ],
)
async def test_a_client_that_breaks_the_protocol_is_closed_with_the_code_that_says_how(
    server: ServerThread, client: httpx.AsyncClient, workspace: Workspace, wire: bytes, code: int
) -> None:
    services = server.services
    assert services is not None
    call_id = await new_call(client, workspace)
    sock = raw_websocket(server, call_id, workspace.key)
    sock.sendall(wire)
    received = await read_until(sock, b"\x00never")  # until the server closes
    frames = list(ws_frames(received))
    assert frames[-1][0] == 0x8 and int.from_bytes(frames[-1][1][:2], "big") == code
    sock.close()


async def test_a_client_that_leaves_while_its_replay_waits_for_room_frees_everything(
    make_server: Callable[..., ServerThread], workspace: Workspace, bus: Client
) -> None:
    server = make_server()
    services = server.services
    assert services is not None
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
        call_id = await new_call(client, workspace)
    js = bus.jetstream()
    payload = {"turn_id": "trn_1", "interrupted_text": "x" * 15_000}
    for _ in range(200):  # ~3 MB of history: more than the socket buffers hold
        envelope = event(workspace, call_id, "call.barge_in", payload)
        await js.publish(call_events_subject(workspace.id, call_id), envelope)
    baseline = server.task_count()
    sock = raw_websocket(server, call_id, workspace.key, receive_buffer=4096)  # reads no more

    def replay_waits() -> bool:
        return any(o.writing_since is not None for o in services.registry.streams)

    await eventually(lambda: server.call(replay_waits))
    sock.close()  # unread bytes: the server sees a reset
    await eventually(lambda: server.call(lambda: len(services.registry.streams)) == 0)
    await eventually(lambda: server.task_count() <= baseline)
    await eventually(lambda: server.call(services.hub.subscription_count) == 0)


async def test_the_close_handshake_completes_when_the_client_answers_our_close(
    server: ServerThread, client: httpx.AsyncClient, workspace: Workspace, bus: Client
) -> None:
    call_id = await new_call(client, workspace)
    assert (await client.delete(f"/v1/calls/{call_id}", headers=workspace.headers)).is_success

    async def end_stored() -> bool:
        return (await stored_call(bus, workspace.id, call_id)).completed

    await eventually(end_stored)  # so the replay holds the end and the socket closes after it
    sock = raw_websocket(server, call_id, workspace.key)
    received = await read_until(sock, b"call ended")  # the history, then our close frame
    assert list(ws_frames(received))[-1][0] == 0x8
    sock.sendall(bytes((0x88, 0x82)) + b"\x00\x00\x00\x00" + (1000).to_bytes(2, "big"))
    # The server closes the socket on the answer, well before it would give up waiting for
    # one (LAST_BYTES_SECONDS): the read ends with the connection, not with its own timeout.
    sock.settimeout(LAST_BYTES_SECONDS / 2)
    assert await asyncio.to_thread(sock.recv, 1) == b""
    sock.close()
