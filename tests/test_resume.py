"""Resume (SPEC 5.1, 5.3, 5.4): cursors valid on every replica; a reconnect with a cursor gets
every durable frame it missed, in order and once, then live, with no gap and no duplicate at the
seam while frames keep flowing; `from=start`; `gap` after drops recovers by resuming; `reset`
for a cursor that is not one; no cursor is exactly the live-only behaviour."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest
from nats.aio.client import Client
from websockets.asyncio.client import connect as ws_connect

from switchboard.client.sse import SseEvent, sse_events
from switchboard.live.history import stored_call
from switchboard.producer import Producer
from tests.harness import ServerThread, Workspace, eventually
from tests.test_streams import ws_url

WAIT = 10.0


async def new_call(client: httpx.AsyncClient, workspace: Workspace) -> str:
    placed = await client.post(
        "/v1/calls",
        headers=workspace.headers,
        json={"to_number": "+14155550180", "from_number": "+14155550181"},
    )
    assert placed.status_code == 201, placed.text
    return str(placed.json()["id"])


async def frames(response: httpx.Response) -> AsyncIterator[SseEvent]:
    """Every SSE event but comments and the retry hint."""
    async for event in sse_events(response):
        if event.comment is None and not (event.retry is not None and event.data is None):
            yield event


async def take(events: AsyncIterator[SseEvent], count: int) -> list[SseEvent]:
    return [await asyncio.wait_for(anext(events), WAIT) for _ in range(count)]


def texts(events: list[SseEvent]) -> list[str]:
    return [orjson.loads(e.data or "")["text"] for e in events]


@contextlib.asynccontextmanager
async def transcript(
    client: httpx.AsyncClient,
    workspace: Workspace,
    call_id: str,
    *,
    cursor: str | None = None,
    query: str = "",
) -> AsyncIterator[AsyncIterator[SseEvent]]:
    headers = dict(workspace.headers)
    if cursor is not None:
        headers["Last-Event-ID"] = cursor
    url = f"/v1/calls/{call_id}/transcript/stream{query}"
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        yield frames(response)


async def speak(
    producer: Producer, workspace: Workspace, call_id: str, text: str, *, final: bool = True
) -> None:
    turn_id = producer.new_turn_id()
    if not final:
        await producer.turn(
            workspace.id, call_id, role="user", text=text, is_final=False, turn_id=turn_id
        )
        return
    await producer.turn(
        workspace.id, call_id, role="user", text=text[:3], is_final=False, turn_id=turn_id
    )
    await producer.turn(
        workspace.id, call_id, role="user", text=text, is_final=True, turn_id=turn_id
    )


@pytest.fixture
async def producer(bus: Client) -> Producer:
    return Producer(bus)


async def test_a_transcript_resumes_with_the_final_turns_it_missed_on_any_replica(
    server: ServerThread,
    make_server: Callable[..., ServerThread],
    producer: Producer,
    workspace: Workspace,
) -> None:
    other = make_server()
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
        call_id = await new_call(client, workspace)
        async with transcript(client, workspace, call_id) as events:
            await speak(producer, workspace, call_id, "one")
            seen = await take(events, 2)  # its partial, then the final
        assert texts(seen) == ["one"[:3], "one"] and seen[1].id is not None
        cursor = seen[1].id
        for text in ("two", "three", "four"):
            await speak(producer, workspace, call_id, text)
    # Another replica, which never saw this client: the finals it missed, then live.
    async with (
        httpx.AsyncClient(base_url=other.url, timeout=WAIT) as client,
        transcript(client, workspace, call_id, cursor=cursor) as events,
    ):
        missed = await take(events, 3)
        assert texts(missed) == ["two", "three", "four"]
        assert all(orjson.loads(e.data or "")["is_final"] for e in missed)
        await speak(producer, workspace, call_id, "five", final=False)
        [live] = await take(events, 1)
        assert texts([live]) == ["five"] and live.id is not None
        order = [int((e.id or "t0")[1:]) for e in [seen[1], *missed, live]]
        assert order == sorted(order) and len(set(order)) == 5


async def test_the_seam_has_no_gap_and_no_duplicate_while_turns_keep_coming(
    make_server: Callable[..., ServerThread], producer: Producer, workspace: Workspace
) -> None:
    # A buffer that a reader on a busy box cannot overrun (drops and their gap notices are
    # another test's): what is tested here is the seam between the replay and the live feed.
    server = make_server(stream_buffer=4096)
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
        call_id = await new_call(client, workspace)
        async with transcript(client, workspace, call_id) as events:
            await speak(producer, workspace, call_id, "t0")
            cursor = (await take(events, 2))[1].id
        for n in range(1, 101):
            await speak(producer, workspace, call_id, f"t{n}")
        total = 400

        async def keep_speaking() -> None:
            for n in range(101, total + 1):
                await speak(producer, workspace, call_id, f"t{n}")

        speaker = asyncio.create_task(keep_speaking())
        try:
            async with transcript(client, workspace, call_id, cursor=cursor) as events:
                finals: list[str] = []
                while len(finals) < total:
                    event = await asyncio.wait_for(anext(events), WAIT)
                    assert event.event is None, (event.event, event.data)  # no gap, no reset
                    turn = orjson.loads(event.data or "")
                    if turn["is_final"]:
                        finals.append(turn["text"])
        finally:
            await speaker
    assert finals == [f"t{n}" for n in range(1, total + 1)]


async def test_from_start_gives_every_final_turn_then_the_turn_in_flight_then_live(
    server: ServerThread, producer: Producer, workspace: Workspace
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
        call_id = await new_call(client, workspace)
        for text in ("alpha", "beta"):
            await speak(producer, workspace, call_id, text)
        await speak(producer, workspace, call_id, "gam", final=False)
        async with transcript(client, workspace, call_id, query="?from=start") as events:
            first = await take(events, 3)
            assert texts(first) == ["alpha", "beta", "gam"]
            assert [orjson.loads(e.data or "")["is_final"] for e in first] == [True, True, False]
            await speak(producer, workspace, call_id, "delta")
            assert texts(await take(events, 2)) == ["del", "delta"]
        # An ended call: its turns, then the end; without from=start or a cursor, 204.
        assert (await client.delete(f"/v1/calls/{call_id}", headers=workspace.headers)).is_success
        async with transcript(client, workspace, call_id, query="?from=start") as events:
            ended = await take(events, 4)
            assert texts(ended[:3]) == ["alpha", "beta", "delta"]
            assert ended[3].event == "end"
        url = f"/v1/calls/{call_id}/transcript/stream"
        assert (await client.get(url, headers=workspace.headers)).status_code == 204


async def test_a_cursor_that_is_not_one_gets_a_reset_then_live(
    server: ServerThread, producer: Producer, workspace: Workspace, bus: Client
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
        call_id = await new_call(client, workspace)
        await speak(producer, workspace, call_id, "before")
        for made_up in ("t999999999999", "e5", "not-a-cursor", "evt_x"):
            async with transcript(client, workspace, call_id, cursor=made_up) as events:
                [reset] = await take(events, 1)
                assert reset.event == "reset"
                assert orjson.loads(reset.data or "") == {"reason": "cursor_unknown"}
                await speak(producer, workspace, call_id, f"after {made_up}")
                assert texts(await take(events, 2))[1] == f"after {made_up}"
        # A cursor of another call's turn is not this call's.
        other_call = await new_call(client, workspace)
        async with transcript(client, workspace, other_call) as events:
            await speak(producer, workspace, other_call, "elsewhere")
            elsewhere = (await take(events, 2))[1].id
        async with transcript(client, workspace, call_id, cursor=elsewhere) as events:
            [reset] = await take(events, 1)
            assert reset.event == "reset"


async def test_dropped_frames_are_announced_as_a_gap_and_recovered_by_resuming(
    make_server: Callable[..., ServerThread], producer: Producer, workspace: Workspace
) -> None:
    server = make_server(stream_buffer=8)
    big = "word " * 3000  # ~15 KB a turn, so an unread socket fills quickly
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
        call_id = await new_call(client, workspace)
        headers = workspace.headers
        url = f"/v1/calls/{call_id}/transcript/stream"
        async with client.stream("GET", url, headers=headers) as response:
            events = frames(response)
            await speak(producer, workspace, call_id, "first")
            await take(events, 2)
            # Stop reading while 300 finals go out: the socket fills, then the outbox drops.
            for n in range(300):
                await producer.turn(
                    workspace.id,
                    call_id,
                    role="agent",
                    text=f"{n} {big}",
                    is_final=True,
                    turn_id=producer.new_turn_id(),
                )
            # Read again; after each frame, a sentinel turn: the first that finds room in the
            # outbox arrives, preceded by the notice of what was dropped before it.
            received: list[SseEvent] = []
            gap: SseEvent | None = None
            while True:
                event = await asyncio.wait_for(anext(events), WAIT)
                if event.event == "gap":
                    gap = gap or event
                    continue
                received.append(event)
                if orjson.loads(event.data or "")["text"] == "last":
                    break
                await producer.turn(
                    workspace.id,
                    call_id,
                    role="agent",
                    text="last",
                    is_final=True,
                    turn_id=producer.new_turn_id(),
                )
        assert gap is not None, "frames were dropped without a gap notice"
        notice = orjson.loads(gap.data or "")
        assert notice["dropped"] > 0 and notice["resume_from"].startswith("t")
        got = {orjson.loads(e.data or "")["text"].split(" ")[0] for e in received}
        missing = [str(n) for n in range(300) if str(n) not in got]
        assert missing, "the burst should not have fit"
        # Resuming from the gap's cursor recovers every dropped final.
        async with client.stream(
            "GET", url, headers={**headers, "Last-Event-ID": notice["resume_from"]}
        ) as response:
            recovered: list[str] = []
            resumed = frames(response)
            while "last" not in recovered:
                event = await asyncio.wait_for(anext(resumed), WAIT)
                assert event.event is None
                recovered.append(orjson.loads(event.data or "")["text"].split(" ")[0])
        assert set(missing) <= set(recovered)


async def test_a_conversation_resumes_from_last_event_id_or_the_query(
    server: ServerThread, make_server: Callable[..., ServerThread], workspace: Workspace
) -> None:
    other = make_server()
    h = workspace.headers
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
        first = await client.post(
            "/v1/messages",
            headers=h,
            json={
                "channel": "sms",
                "to_number": "+14155550182",
                "from_number": "+14155550183",
                "text": "m0",
            },
        )
        conversation = first.json()["conversation_id"]
        url = f"/v1/conversations/{conversation}/stream"
        async with client.stream("GET", url, headers=h) as response:
            events = frames(response)
            await client.post(
                "/v1/messages", headers=h, json={"conversation_id": conversation, "text": "m1"}
            )
            seen = await asyncio.wait_for(anext(events), WAIT)
            while orjson.loads(seen.data or "")["payload"]["text"] != "m1":
                seen = await asyncio.wait_for(anext(events), WAIT)
        cursor = seen.id
        assert cursor is not None and cursor.startswith("e")
        for text in ("m2", "m3"):
            await client.post(
                "/v1/messages", headers=h, json={"conversation_id": conversation, "text": text}
            )
        await client.patch(
            f"/v1/conversations/{conversation}", headers=h, json={"ai_mode": "human"}
        )

    def summary(event: SseEvent) -> str:
        envelope: dict[str, Any] = orjson.loads(event.data or "")
        return str(envelope["payload"].get("text") or envelope["payload"].get("to_mode"))

    async with httpx.AsyncClient(base_url=other.url, timeout=WAIT) as client:
        for how in ("header", "query"):
            headers = {**h, "Last-Event-ID": cursor} if how == "header" else h
            query = "" if how == "header" else f"?last_event_id={cursor}"
            async with client.stream("GET", url + query, headers=headers) as response:
                missed = [summary(e) for e in await take(frames(response), 3)]
            assert missed == ["m2", "m3", "human"], how


async def test_a_call_socket_resumes_after_the_last_event_id_it_saw(
    server: ServerThread,
    make_server: Callable[..., ServerThread],
    workspace: Workspace,
    producer: Producer,
) -> None:
    other = make_server()
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
        call_id = await new_call(client, workspace)

    async def barge(n: int) -> None:
        await producer.event(
            "call.barge_in",
            workspace_id=workspace.id,
            call_id=call_id,
            payload={"turn_id": f"trn_{n}", "interrupted_text": f"b{n}"},
        )

    # The API's call.initiated reaches the bus through the outbox relay, just after the 2xx:
    # wait for it, or barge(1) may be stored first.
    async def initiated() -> bool:
        return (await stored_call(producer.client, workspace.id, call_id)).initiated

    await eventually(initiated)
    await barge(1)
    async with ws_connect(ws_url(server, call_id), additional_headers=workspace.headers) as ws:
        received = [orjson.loads(await asyncio.wait_for(ws.recv(), WAIT)) for _ in range(2)]
    assert [e["event_type"] for e in received] == ["call.initiated", "call.barge_in"]
    cursor = received[-1]["event_id"]
    await barge(2)
    await barge(3)
    url = ws_url(other, call_id) + f"?last_event_id={cursor}"
    async with ws_connect(url, additional_headers=workspace.headers) as ws:
        missed = [orjson.loads(await asyncio.wait_for(ws.recv(), WAIT)) for _ in range(2)]
        assert [e["payload"]["interrupted_text"] for e in missed] == ["b2", "b3"]
        await barge(4)
        live = orjson.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert live["payload"]["interrupted_text"] == "b4"
    url = ws_url(other, call_id) + "?last_event_id=evt_madeUpmadeUpmadeUp12"
    async with ws_connect(url, additional_headers=workspace.headers) as ws:
        reset = orjson.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert reset == {"event_type": "stream.reset", "reason": "cursor_unknown"}


async def test_the_workspace_stream_carries_its_events_filtered_and_resumes(
    server: ServerThread,
    make_server: Callable[..., ServerThread],
    workspace: Workspace,
    other_workspace: Workspace,
) -> None:
    h = workspace.headers
    url = "/v1/events/stream?event_types=call.initiated,message.*"
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
        refused = await client.get(f"/v1/events/stream?token={workspace.key}")
        assert refused.status_code == 401
        bad = await client.get("/v1/events/stream?event_types=call.nope", headers=h)
        assert bad.status_code == 400 and "event_types" in bad.json()["message"]
        async with (
            client.stream("GET", url, headers=h) as response,
            client.stream("GET", url, headers=h) as twin,
        ):
            assert response.status_code == 200 and twin.status_code == 200
            events = frames(response)
            assert server.services is not None
            hub = server.services.hub
            subject = f"vb.{workspace.id}.*.*.events"
            assert server.call(lambda: subject in hub.topics)  # one topic for both clients
            # Another workspace's activity, and events the filter leaves out.
            await new_call(client, other_workspace)
            call_id = await new_call(client, workspace)
            sent = await client.post(
                "/v1/messages",
                headers=h,
                json={
                    "channel": "sms",
                    "to_number": "+14155550190",
                    "from_number": "+14155550191",
                    "text": "w1",
                },
            )
            conversation = sent.json()["conversation_id"]
            await client.patch(
                f"/v1/conversations/{conversation}", headers=h, json={"ai_mode": "human"}
            )
            await client.post(
                "/v1/messages", headers=h, json={"conversation_id": conversation, "text": "w2"}
            )
            got = await take(events, 3)
            envelopes = [orjson.loads(e.data or "") for e in got]
            assert [e["event_type"] for e in envelopes] == [
                "call.initiated",
                "message.sent",
                "message.sent",
            ]
            assert envelopes[0]["call_id"] == call_id
            assert all(e["workspace_id"] == workspace.id for e in envelopes)
            cursor = got[1].id
        for text in ("w3", "w4"):
            await client.post(
                "/v1/messages", headers=h, json={"conversation_id": conversation, "text": text}
            )
    other = make_server()
    async with (
        httpx.AsyncClient(base_url=other.url, timeout=WAIT) as client,
        client.stream("GET", url, headers={**h, "Last-Event-ID": cursor or ""}) as response,
    ):
        missed = [
            orjson.loads(e.data or "")["payload"]["text"] for e in await take(frames(response), 3)
        ]
        assert missed == ["w2", "w3", "w4"]


async def test_a_final_turn_sent_again_is_stored_once(
    producer: Producer, bus: Client, workspace: Workspace, nats_url: str
) -> None:
    """A producer that retries a final turn (it got an error, e.g. while a clustered stream
    elected a leader) must not store it, or its call.transcription, twice."""
    from switchboard.events import call_events_subject, call_transcript_subject
    from switchboard.ids import new_id
    from tests.test_faults import stored_events

    call_id = new_id("call")
    turn_id = producer.new_turn_id()
    for _ in range(3):
        await producer.turn(
            workspace.id, call_id, role="agent", text="once", is_final=True, turn_id=turn_id
        )
    envelopes = await stored_events(nats_url, call_events_subject(workspace.id, call_id))
    assert [e["payload"]["turn_id"] for e in envelopes] == [turn_id]
    js = bus.jetstream()
    last = await js.get_last_msg("VB_TRANSCRIPTS", call_transcript_subject(workspace.id, call_id))
    first = await js.get_msg(
        "VB_TRANSCRIPTS", seq=1, subject=call_transcript_subject(workspace.id, call_id), next=True
    )
    assert last.seq == first.seq, "the final was stored more than once"
