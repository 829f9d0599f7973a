"""The Python client and `switchboard tail` against a real server, bus and simulator."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest
from nats.aio.client import Client

from switchboard.client import StreamError, SwitchboardClient
from switchboard.client.tail import CLEAR_LINE, render_turn
from switchboard.events import call_transcript_subject
from switchboard.producer import Producer
from switchboard.simulate import SimulationPlan, Simulator
from tests.harness import ServerThread, Workspace, eventually
from tests.test_listen import chunk, index_of, listeners
from tests.test_streams import new_call, turn

WAIT = 10.0


async def test_transcript_iterator_skips_heartbeats_and_ends_with_the_call(
    make_server: Callable[..., ServerThread], workspace: Workspace, bus: Client
) -> None:
    server = make_server(heartbeat_interval=0.2)
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
        SwitchboardClient(server.url, workspace.key) as sb,
    ):
        call_id = await new_call(http, workspace)
        received: list[dict[str, Any]] = []

        async def read() -> None:
            async for item in sb.transcript(call_id):
                received.append(item)

        reader = asyncio.create_task(read())
        services = server.services
        assert services is not None
        # Heartbeats flow first; none may surface as a turn.
        await eventually(
            lambda: server.call(lambda: services.metrics.heartbeats["transcript_sse"]) >= 2
        )
        await bus.publish(call_transcript_subject(workspace.id, call_id), turn("Hi", False))
        await bus.publish(call_transcript_subject(workspace.id, call_id), turn("Hi there", True))
        await bus.flush()
        await eventually(lambda: len(received) >= 2)
        await http.delete(f"/v1/calls/{call_id}", headers=workspace.headers)
        await asyncio.wait_for(reader, WAIT)
        assert [(t["text"], t["is_final"]) for t in received] == [("Hi", False), ("Hi there", True)]
        # An ended call: the iterator ends at once (204), no reconnecting.
        assert [t async for t in sb.transcript(call_id)] == []


async def test_silence_past_the_heartbeat_timeout_reconnects(
    server: ServerThread, workspace: Workspace, client: httpx.AsyncClient, bus: Client
) -> None:
    call_id = await new_call(client, workspace)
    async with SwitchboardClient(server.url, workspace.key, heartbeat_timeout=0.3) as sb:
        stream = sb.transcript(call_id)
        first = asyncio.create_task(anext(stream))
        # The 30 s heartbeat never comes within 0.3 s: it keeps reconnecting.
        await eventually(lambda: sb.connections >= 3)
        await bus.publish(call_transcript_subject(workspace.id, call_id), turn("still here", True))
        assert (await asyncio.wait_for(first, WAIT))["text"] == "still here"
        await stream.aclose()


async def test_terminal_errors_raise(
    server: ServerThread,
    workspace: Workspace,
    other_workspace: Workspace,
    client: httpx.AsyncClient,
) -> None:
    call_id = await new_call(client, workspace)
    async with SwitchboardClient(server.url, other_workspace.key) as sb:
        with pytest.raises(StreamError) as refused:
            await anext(sb.transcript(call_id))
        assert refused.value.error_code == "NOT_FOUND"
        with pytest.raises(StreamError):
            async with sb.call_events(call_id):
                pass


async def test_call_socket_sends_dtmf_and_yields_events_to_the_end(
    server: ServerThread, workspace: Workspace, client: httpx.AsyncClient, bus: Client
) -> None:
    simulator = Simulator(
        bus, SimulationPlan(workspace.id, calls=0, conversations=0, seed=4, pace=0.3)
    )
    await simulator.start()
    try:
        call_id = (
            await client.post(
                "/v1/calls",
                headers=workspace.headers,
                json={"to_number": "+14155550190", "from_number": "+14155550000"},
            )
        ).json()["id"]
        await eventually(lambda: call_id in simulator.live_calls)
        async with (
            SwitchboardClient(server.url, workspace.key) as sb,
            sb.call_events(call_id) as call,
        ):
            kinds: list[str] = []

            async def consume() -> None:
                async for event in call:
                    kinds.append(event["event_type"])

            consumer = asyncio.create_task(consume())
            result = await call.send_dtmf("7*")
            assert result["ok"] is True
            await asyncio.wait_for(consumer, 60)
        assert kinds[0] == "call.initiated" and kinds[-1] == "call.completed"
        assert ("call.dtmf_sent" in kinds and len(kinds) == len(set(kinds))) or kinds.count(
            "call.completed"
        ) == 1
    finally:
        await simulator.stop()


async def test_the_client_resumes_on_another_replica_with_every_final_turn_it_missed(
    make_server: Callable[..., ServerThread],
    workspace: Workspace,
    client: httpx.AsyncClient,
    bus: Client,
) -> None:
    draining, other = make_server(drain_seconds=0.2), make_server()
    producer = Producer(bus)

    async def speak(text: str) -> None:
        turn_id = producer.new_turn_id()
        for partial in (True, False):
            await producer.turn(
                workspace.id, call_id, role="user", text=text, is_final=not partial, turn_id=turn_id
            )

    call_id = await new_call(client, workspace)
    async with SwitchboardClient([draining.url, other.url], workspace.key) as sb:
        stream = sb.transcript(call_id)
        first = asyncio.create_task(anext(stream))
        await eventually(lambda: sb.connections == 1)
        await speak("one")
        assert (await asyncio.wait_for(first, WAIT))["is_final"] is False
        assert (await asyncio.wait_for(anext(stream), WAIT))["text"] == "one"
        # Nothing reads the stream while its replica drains away and the call goes on and ends:
        # the client learns of it on its next read, and resumes on the other replica.
        await asyncio.to_thread(draining.stop)
        await speak("two")
        await speak("three")
        await client.delete(f"/v1/calls/{call_id}", headers=workspace.headers)
        rest = await asyncio.wait_for(_all(stream), WAIT)
    assert [(t["text"], t["is_final"]) for t in rest] == [("two", True), ("three", True)]
    assert sb.connections == 2 and stream.cursor is not None


async def test_the_workspace_stream_resumes_on_another_replica(
    make_server: Callable[..., ServerThread], workspace: Workspace, client: httpx.AsyncClient
) -> None:
    draining, other = make_server(drain_seconds=0.2), make_server()

    async def send(text: str, conversation_id: str | None = None) -> str:
        message: dict[str, Any] = {"text": text}
        if conversation_id is None:
            message |= {
                "channel": "sms",
                "to_number": "+14155550194",
                "from_number": "+14155550000",
            }
        else:
            message["conversation_id"] = conversation_id
        sent = await client.post("/v1/messages", headers=workspace.headers, json=message)
        assert sent.status_code == 201, sent.text
        return str(sent.json()["conversation_id"])

    async with SwitchboardClient([draining.url, other.url], workspace.key) as sb:
        stream = sb.events(["message.*"])
        first = asyncio.create_task(anext(stream))
        await eventually(lambda: sb.connections == 1)
        conversation_id = await send("one")
        seen = [await asyncio.wait_for(first, WAIT)]
        await asyncio.to_thread(draining.stop)
        await send("two", conversation_id)
        await send("three", conversation_id)
        while len(seen) < 3:
            seen.append(await asyncio.wait_for(anext(stream), WAIT))
        await stream.aclose()
    assert [(e["event_type"], e["payload"]["text"]) for e in seen] == [
        ("message.sent", "one"),
        ("message.sent", "two"),
        ("message.sent", "three"),
    ]
    assert sb.connections == 2 and (stream.cursor or "").startswith("e")


async def _all(stream: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [item async for item in stream]


def test_tail_renders_partials_in_place_on_a_terminal_and_finals_only_in_a_pipe() -> None:
    partial = {"role": "user", "text": "Hel", "is_final": False}
    final = {"role": "user", "text": "Hello", "is_final": True}
    assert render_turn(partial, tty=True) == CLEAR_LINE + " user: Hel"
    assert render_turn(final, tty=True) == CLEAR_LINE + " user: Hello\n"
    assert render_turn(partial, tty=False) is None
    assert render_turn(final, tty=False) == " user: Hello\n"


async def test_tail_command_follows_a_call_to_its_end(
    server: ServerThread, workspace: Workspace, client: httpx.AsyncClient, bus: Client
) -> None:
    call_id = await new_call(client, workspace)
    env = {**os.environ, "SWITCHBOARD_API_KEY": workspace.key}
    tail = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "switchboard",
        "tail",
        call_id,
        "--url",
        server.url,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        subject = call_transcript_subject(workspace.id, call_id)
        for attempt in range(200):  # until tail has connected (its turns then start arriving)
            await bus.publish(
                subject,
                orjson.dumps(
                    {
                        "role": "agent",
                        "text": f"ping {attempt}",
                        "is_final": True,
                        "turn_id": f"trn_{attempt:020d}",
                        "ts": "t",
                    }
                ),
            )
            await asyncio.sleep(0.05)
            if server.call(lambda: len(server.services.registry.streams)) >= 1:  # type: ignore[union-attr]
                break
        await bus.publish(subject, turn("Goodbye now", True, role="agent"))
        await bus.flush()
        await client.delete(f"/v1/calls/{call_id}", headers=workspace.headers)
        out, err = await asyncio.wait_for(tail.communicate(), WAIT)
    finally:
        if tail.returncode is None:
            tail.kill()
    text = out.decode()
    assert tail.returncode == 0, err.decode()
    assert "agent: Goodbye now" in text and text.rstrip().endswith("-- call ended")
    assert workspace.key not in text + err.decode()


def tail_env(**values: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("SWITCHBOARD_URL", "SWITCHBOARD_API_KEY")
    }
    return {**env, **values}


def test_tail_without_a_key_names_the_variable_to_set() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "switchboard", "tail", "events"],
        capture_output=True,
        text=True,
        env=tail_env(),
        timeout=30,
    )
    assert done.returncode == 2
    assert "SWITCHBOARD_API_KEY" in done.stderr and "Traceback" not in done.stderr


async def test_tail_reads_switchboard_url_and_says_when_it_reconnects(
    make_server: Callable[..., ServerThread], workspace: Workspace, client: httpx.AsyncClient
) -> None:
    draining, other = make_server(drain_seconds=0.2), make_server()
    tail = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "switchboard",
        "tail",
        "events",
        "--event-types",
        "message.*",
        env=tail_env(
            SWITCHBOARD_URL=f"{draining.url},{other.url}", SWITCHBOARD_API_KEY=workspace.key
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert tail.stdout is not None and tail.stderr is not None
    told: list[str] = []

    async def said(stream: asyncio.StreamReader, text: str) -> None:
        while text not in (line := (await stream.readline()).decode()):
            assert line, f"tail ended before it said {text!r}: {told}"
            told.append(line)

    async def send(text: str) -> None:
        message = {"channel": "sms", "to_number": "+14155550195", "from_number": "+1415555000"}
        sent = await client.post(
            "/v1/messages", headers=workspace.headers, json=message | {"text": text}
        )
        assert sent.status_code == 201, sent.text

    try:
        # The first URL of SWITCHBOARD_URL serves it...
        await eventually(lambda: draining.call(lambda: len(draining.services.registry.streams)))  # type: ignore[union-attr]
        await send("before the drain")
        await asyncio.wait_for(said(tail.stdout, "before the drain"), WAIT)
        # ...and when it drains away, tail says so and goes on with the second.
        await asyncio.to_thread(draining.stop)
        await asyncio.wait_for(said(tail.stderr, f"-- reconnecting to {other.url}"), WAIT)
        await asyncio.wait_for(said(tail.stderr, f"-- reconnected to {other.url}"), WAIT)
        await send("after the drain")
        await asyncio.wait_for(said(tail.stdout, "after the drain"), WAIT)
    finally:
        tail.kill()
        await tail.wait()
    assert workspace.key not in "".join(told)


# --- listening ---------------------------------------------------------------------------------


async def test_the_client_listens_again_after_a_reconnect_and_stops_on_unlisten(
    make_server: Callable[..., ServerThread],
    workspace: Workspace,
    client: httpx.AsyncClient,
    bus: Client,
) -> None:
    draining, other = make_server(drain_seconds=0.2), make_server()
    producer = Producer(bus)
    call_id = await new_call(client, workspace)
    heard: list[int] = []

    async def play(indices: range) -> None:
        for index in indices:
            await producer.audio(workspace.id, call_id, chunk(index))
        await eventually(lambda: heard[-1:] == [indices[-1]])

    async with (
        SwitchboardClient([draining.url, other.url], workspace.key) as sb,
        sb.call_events(call_id) as call,
    ):

        async def listen() -> None:
            async for pcm in call.listen():
                assert len(pcm) == 640
                heard.append(index_of(pcm))

        listening = asyncio.create_task(listen())
        try:
            await eventually(lambda: listeners(draining, workspace.id, call_id) == 1)
            await play(range(10))
            # Its replica drains away: the socket goes on with the other, and listens there too.
            await asyncio.to_thread(draining.stop)
            await eventually(lambda: listeners(other, workspace.id, call_id) == 1)
            await play(range(100, 110))
            await call.unlisten()
            await asyncio.wait_for(listening, WAIT)  # ends once the server has answered
        finally:
            listening.cancel()
        await eventually(lambda: listeners(other, workspace.id, call_id) == 0)
    assert heard == [*range(10), *range(100, 110)]
    assert sb.connections == 2


async def test_listen_yields_the_calls_audio_until_it_ends(
    server: ServerThread,
    workspace: Workspace,
    other_workspace: Workspace,
    client: httpx.AsyncClient,
    bus: Client,
) -> None:
    producer = Producer(bus)
    call_id = await new_call(client, workspace)
    async with SwitchboardClient(server.url, other_workspace.key) as stranger:
        with pytest.raises(StreamError) as refused:
            await anext(stranger.listen(call_id))
        assert refused.value.error_code == "NOT_FOUND"
    async with SwitchboardClient(server.url, workspace.key) as sb:
        chunks: list[bytes] = []

        async def listen() -> None:
            async for pcm in sb.listen(call_id):
                chunks.append(pcm)

        listening = asyncio.create_task(listen())
        try:
            await eventually(lambda: listeners(server, workspace.id, call_id) == 1)
            for index in range(5):
                await producer.audio(workspace.id, call_id, chunk(index))
            await eventually(lambda: len(chunks) == 5)
            await client.delete(f"/v1/calls/{call_id}", headers=workspace.headers)
            await asyncio.wait_for(listening, WAIT)
        finally:
            listening.cancel()
    assert chunks == [chunk(index) for index in range(5)]
