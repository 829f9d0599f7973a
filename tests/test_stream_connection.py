"""A live SSE stream's connection is taken over by a protocol object of ours and its ASGI call
returns (issue 13, memory per stream; live/sse_connection.py, api/handoff.py). On a real
server: the stream holds no task, and everything the call held for the stream's life is still
held until the stream ends and released then (its open-stream slot, hub subscriptions, registry
entry, access-log line), whichever way it ends."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterator

import httpx
import pytest
from nats.aio.client import Client

from switchboard.client.sse import sse_events
from switchboard.events import call_transcript_subject
from tests.harness import ServerThread, Workspace, eventually
from tests.test_streams import new_call, next_event, turn

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
