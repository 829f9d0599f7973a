"""SPEC section 6 on a real server: backpressure, release on disconnect, revocation, drain."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import httpx
import orjson
import pytest
from nats.aio.client import Client
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from switchboard.client.sse import SseEvent, sse_events
from switchboard.events import call_transcript_subject
from switchboard.live.outbox import Outbox
from tests.harness import ServerThread, Workspace, eventually
from tests.test_streams import new_call, next_event, turn, ws_url

WAIT = 5.0


def stalled_reader(server: ServerThread, path: str, key: str) -> socket.socket:
    """An SSE client that sends its request and then never reads: a tiny receive buffer, so the
    server's writes back up almost at once."""
    port = int(server.url.rsplit(":", 1)[1])
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", port))
    raw.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
    return raw


async def test_a_stalled_client_does_not_delay_another_and_its_memory_stays_bounded(
    make_server: Callable[..., ServerThread], workspace: Workspace, bus: Client
) -> None:
    server = make_server(stream_buffer=16)
    services = server.services
    assert services is not None
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        call_id = await new_call(client, workspace)
        path = f"/v1/calls/{call_id}/transcript/stream"
        stalled = stalled_reader(server, path, workspace.key)
        try:
            await eventually(lambda: server.call(lambda: len(services.registry.streams)) == 1)
            async with client.stream("GET", path, headers=workspace.headers) as response:
                events = sse_events(response)
                await next_event(events)
                subject = call_transcript_subject(workspace.id, call_id)
                big = "word " * 3000  # ~15 KB a frame, so the stalled socket fills quickly
                ids: list[int] = []  # the cursors' sequences (`t123`)
                worst = 0.0
                for batch in range(40):
                    started = time.monotonic()
                    for n in range(10):
                        await bus.publish(subject, turn(f"{batch}.{n} {big}", n == 9))
                    for _ in range(10):
                        frame = await next_event(events)
                        assert frame.event is None, frame.event  # no gap for this reader
                        ids.append(int((frame.id or "t0")[1:]))
                    worst = max(worst, time.monotonic() - started)
                # The reading client got every frame, in order, without a gap...
                assert len(ids) == 400 and ids == sorted(set(ids))
                assert worst < 2.0, f"a batch took {worst:.2f} s to arrive"

                # ...while the stalled one's outbox never grew past its bound, and dropped.
                def stalled_state() -> tuple[int, int]:
                    outboxes: list[Outbox] = list(services.registry.streams)
                    worst_box = max(outboxes, key=lambda o: o.dropped)
                    return len(worst_box), worst_box.dropped

                queued, dropped = server.call(stalled_state)
                assert queued <= 16
                assert dropped > 100  # the rest fit in the kernel socket buffers
        finally:
            stalled.close()
        metrics = (await client.get("/metrics")).text
    line = next(
        x
        for x in metrics.splitlines()
        if x.startswith('switchboard_frames_dropped_total{kind="transcript_sse"}')
    )
    assert int(line.split()[-1]) > 100


async def test_connect_disconnect_cycles_leave_no_subscription_or_task_behind(
    make_server: Callable[..., ServerThread], workspace: Workspace
) -> None:
    server = make_server()
    services = server.services
    assert services is not None
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        call_id = await new_call(client, workspace)
        message = await client.post(
            "/v1/messages",
            headers=workspace.headers,
            json={
                "channel": "sms",
                "to_number": "+14155550140",
                "from_number": "+14155550141",
                "text": "x",
            },
        )
        conversation_path = f"/v1/conversations/{message.json()['conversation_id']}/stream"
        baseline = server.task_count()
        for cycle in range(200):
            kind = cycle % 3
            if kind == 2:
                async with ws_connect(
                    ws_url(server, call_id), additional_headers=workspace.headers
                ):
                    pass
                continue
            path = f"/v1/calls/{call_id}/transcript/stream" if kind == 0 else conversation_path
            async with client.stream("GET", path, headers=workspace.headers) as response:
                assert response.status_code == 200
                await next_event(sse_events(response))
        await eventually(lambda: server.call(services.hub.subscription_count) == 0)
        await eventually(lambda: server.call(lambda: len(services.registry.streams)) == 0)
        await eventually(lambda: server.task_count() <= baseline)
        assert server.call(lambda: dict(services.metrics.open_streams)) == {
            "transcript_sse": 0,
            "conversation_sse": 0,
            "call_websocket": 0,
        }


async def test_revoking_a_key_ends_its_streams_on_every_replica_within_a_second(
    make_server: Callable[..., ServerThread], workspace: Workspace
) -> None:
    first, second = make_server(), make_server()
    async with httpx.AsyncClient(timeout=10) as client:
        created = await client.post(f"{first.url}/v1/keys", headers=workspace.headers, json={})
        key, key_id = created.json()["api_key"], created.json()["id"]
        headers = {"Authorization": f"Bearer {key}"}
        call_id = (
            await client.post(
                f"{first.url}/v1/calls",
                headers=headers,
                json={"to_number": "+14155550100", "from_number": "+14155550101"},
            )
        ).json()["id"]
        token = (
            await client.post(
                f"{first.url}/v1/stream-tokens", headers=headers, json={"call_id": call_id}
            )
        ).json()["token"]
        path = f"/v1/calls/{call_id}/transcript/stream"
        async with (
            client.stream("GET", second.url + path, headers=headers) as by_key,
            client.stream("GET", second.url + path, params={"token": token}) as by_token,
            ws_connect(ws_url(second, call_id), additional_headers=headers) as socket_by_key,
        ):
            key_events, token_events = sse_events(by_key), sse_events(by_token)
            await next_event(key_events)
            await next_event(token_events)
            assert orjson.loads(await socket_by_key.recv())["event_type"] == "call.initiated"
            started = time.monotonic()
            revoked = await client.delete(
                f"{first.url}/v1/keys/{key_id}", headers=workspace.headers
            )
            assert revoked.status_code == 200
            for events in (key_events, token_events):
                ending: SseEvent = await next_event(events)
                assert ending.event == "error"
                assert orjson.loads(ending.data or "")["error_code"] == "UNAUTHENTICATED"
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(socket_by_key.recv(), WAIT)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
            assert time.monotonic() - started < 1.0


async def test_drain_on_shutdown_tells_every_stream_to_reconnect(
    make_server: Callable[..., ServerThread], workspace: Workspace
) -> None:
    server = make_server()
    async with httpx.AsyncClient(timeout=10) as client:
        call_id = (
            await client.post(
                f"{server.url}/v1/calls",
                headers=workspace.headers,
                json={"to_number": "+14155550100", "from_number": "+14155550101"},
            )
        ).json()["id"]
        async with (
            client.stream(
                "GET",
                f"{server.url}/v1/calls/{call_id}/transcript/stream",
                headers=workspace.headers,
            ) as response,
            ws_connect(ws_url(server, call_id), additional_headers=workspace.headers) as peer,
        ):
            events = sse_events(response)
            await next_event(events)
            assert orjson.loads(await peer.recv())["event_type"] == "call.initiated"
            started = time.monotonic()
            stopping = asyncio.get_running_loop().run_in_executor(None, server.stop)
            ending = await next_event(events)
            assert ending.event == "error"
            assert orjson.loads(ending.data or "")["error_code"] == "UNAVAILABLE"
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(peer.recv(), WAIT)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
            await asyncio.wait_for(stopping, 10)
            assert time.monotonic() - started < 5.0


async def test_metrics_never_carry_ids(client: httpx.AsyncClient, workspace: Workspace) -> None:
    await client.get("/v1/workspace", headers={"Authorization": "Bearer pk_live_" + "Z" * 40})
    text = (await client.get("/metrics")).text
    assert "switchboard_open_streams" in text and "switchboard_bus_subscriptions" in text
    assert 'switchboard_auth_failures_total{reason="unknown_or_revoked"}' in text
    for marker in ("ws_", "key_", "call_", "conv_", "pk_live", "st_"):
        assert marker not in text.replace("switchboard_", "").replace("call_websocket", ""), marker
