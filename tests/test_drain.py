"""The paced drain (SPEC 5.4 and 6): on shutdown, streams end spread over the drain window, each
client told to come back after its own delay, and the shutdown still finishes."""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from switchboard.client.sse import SseEvent, sse_events
from switchboard.live.frames import Ending, Terminal
from switchboard.live.metrics import Metrics
from switchboard.live.outbox import Outbox
from switchboard.live.registry import StreamRegistry, drain_retry_ms, drain_schedule
from tests.harness import ServerThread, Workspace, eventually
from tests.test_streams import new_call, ws_url

WINDOW = 1.5
PER_KIND = 20  # transcript SSE, conversation SSE and WebSocket streams each
TIMEOUT = 30.0
WS_REASON = re.compile(r"server draining; reconnect in (\d+) ms")


# --- the pure schedule -----------------------------------------------------------------------


def test_schedule_spreads_many_streams_evenly_over_the_window_in_random_order() -> None:
    offsets = drain_schedule(10_000, 5.0, random.Random(1))
    assert len(offsets) == 10_000
    batches = sorted(set(offsets))
    # 100 batches, 50 ms apart, the first at once and the last just inside the window...
    assert len(batches) == 100
    assert batches[0] == 0.0 and batches[-1] == pytest.approx(4.95)
    assert all(b - a == pytest.approx(0.05) for a, b in itertools.pairwise(batches))
    # ...of 100 streams each...
    assert {offsets.count(b) for b in batches} == {100}
    # ...and which stream goes when is shuffled, differently for each drain.
    assert offsets != sorted(offsets)
    assert drain_schedule(10_000, 5.0, random.Random(2)) != offsets
    assert drain_schedule(10_000, 5.0, random.Random(1)) == offsets


def test_schedule_of_few_streams_does_not_stretch_them_over_the_window() -> None:
    assert drain_schedule(0, 5.0, random.Random(1)) == []
    assert drain_schedule(1, 5.0, random.Random(1)) == [0.0]
    assert sorted(drain_schedule(3, 5.0, random.Random(1))) == pytest.approx([0.0, 0.05, 0.1])
    # Uneven counts: batches differ by one stream at most.
    offsets = drain_schedule(61, 1.5, random.Random(1))
    assert len(set(offsets)) == 30
    assert {offsets.count(b) for b in set(offsets)} == {2, 3}
    assert max(offsets) == pytest.approx(1.45)
    # A window shorter than a step ends everything at once.
    assert drain_schedule(7, 0.01, random.Random(1)) == [0.0] * 7


def test_retry_hint_is_jittered_between_one_second_and_one_second_plus_the_window() -> None:
    rng = random.Random(1)
    hints = [drain_retry_ms(5.0, rng) for _ in range(1000)]
    assert all(1000 <= hint <= 6000 for hint in hints)
    assert min(hints) < 1500 and max(hints) > 5500  # the whole range is used
    assert len(set(hints)) > 900


def test_a_drain_terminal_carries_its_retry_hint_on_both_transports() -> None:
    terminal = Terminal(Ending.DRAINING, retry_ms=2345)
    # One event: `retry:` first, so the delay is set before the error is dispatched.
    assert terminal.sse() == (
        b"retry: 2345\nevent: error\n"
        b'data: {"error_code":"UNAVAILABLE","message":"The server is restarting; reconnect."}\n\n'
    )
    assert terminal.websocket_close() == (1012, "server draining; reconnect in 2345 ms")
    assert not Terminal(Ending.DRAINING).sse().startswith(b"retry:")


async def test_registry_drain_paces_spares_ending_streams_refuses_newcomers_and_hurries() -> None:
    metrics = Metrics()
    registry = StreamRegistry(metrics, rng=random.Random(1))
    boxes = [Outbox(4) for _ in range(40)]  # 40 batches, 50 ms apart: two seconds
    for box in boxes:
        registry.add(box, "transcript_sse", "key_a")
    completed = boxes[0]
    completed.offer(b"last turn")
    completed.end(Terminal(Ending.CALL_COMPLETED))
    live = boxes[1]
    live.offer(b"queued")
    drain = asyncio.create_task(registry.drain(window=10.0, grace=5.0))
    await eventually(lambda: any(box.terminal is not None for box in boxes[2:]))
    assert sum(box.terminal is not None for box in boxes[2:]) < 10
    # A stream that opens during the drain is ended at once, with its own hint.
    newcomer = Outbox(4)
    registry.add(newcomer, "call_websocket", "key_a")
    assert newcomer.terminal is not None and newcomer.terminal.ending is Ending.DRAINING
    assert newcomer.terminal.retry_ms is not None
    # Cancelled (a second Ctrl-C), the drain ends every stream still open at once.
    drain.cancel()
    with pytest.raises(asyncio.CancelledError):
        await drain
    assert all(box.terminal is not None for box in boxes)
    # A stream that was already ending keeps its own ending...
    assert completed.terminal == Terminal(Ending.CALL_COMPLETED)
    # ...and a live one gets what was queued for it before its terminal.
    assert await live.next() == b"queued"
    ending = await live.next()
    assert isinstance(ending, Terminal) and ending.ending is Ending.DRAINING
    hints = {box.terminal.retry_ms for box in boxes[1:] if box.terminal is not None}
    assert len(hints) > 30 and all(h is not None and 1000 <= h <= 11_000 for h in hints)
    drained = metrics.counter("switchboard_streams_drained_total", "", "kind")
    assert drained == {"transcript_sse": 39, "call_websocket": 1}


# --- on a real server ------------------------------------------------------------------------


@dataclass
class Ended:
    kind: str
    at: float  # time.monotonic() when the client saw its stream end
    retry_ms: int | None
    code: str | int  # SSE error_code, or WebSocket close code


class Clients:
    """Many stream clients of one server, each noting when and how its stream ended."""

    def __init__(self, http: httpx.AsyncClient, total: int) -> None:
        self.http = http
        self.total = total
        self.opened = 0
        self.all_open = asyncio.Event()

    def _open(self) -> None:
        self.opened += 1
        if self.opened == self.total:
            self.all_open.set()

    async def sse(self, kind: str, url: str, headers: dict[str, str]) -> Ended:
        async with self.http.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200
            events = sse_events(response)
            await self._next(events)  # the opening retry hint
            self._open()
            while True:
                event = await self._next(events)
                if event.event is not None:
                    break  # data frames (a conversation's first message) may come first
            assert event.event == "error", event
            return Ended(
                kind, time.monotonic(), event.retry, orjson.loads(event.data or "")["error_code"]
            )

    async def websocket(self, url: str, headers: dict[str, str]) -> Ended:
        async with ws_connect(url, additional_headers=headers) as peer:
            assert orjson.loads(await peer.recv())["event_type"] == "call.initiated"
            self._open()
            try:
                while True:
                    await asyncio.wait_for(peer.recv(), TIMEOUT)
            except ConnectionClosed as closed:
                at = time.monotonic()
                assert closed.rcvd is not None
                hint = WS_REASON.fullmatch(closed.rcvd.reason)
                assert hint is not None, closed.rcvd.reason
                return Ended("call_websocket", at, int(hint.group(1)), closed.rcvd.code)

    @staticmethod
    async def _next(events: AsyncIterator[SseEvent]) -> SseEvent:
        while True:
            event = await asyncio.wait_for(anext(events), TIMEOUT)
            if event.comment is None:
                return event


async def new_conversation(http: httpx.AsyncClient, server: ServerThread, ws: Workspace) -> str:
    sent = await http.post(
        f"{server.url}/v1/messages",
        headers=ws.headers,
        json={
            "channel": "sms",
            "to_number": "+14155550140",
            "from_number": "+14155550141",
            "text": "x",
        },
    )
    assert sent.status_code in (200, 201), sent.text
    return str(sent.json()["conversation_id"])


async def test_shutdown_ends_streams_spread_over_the_window_with_jittered_hints(
    make_server: Callable[..., ServerThread], workspace: Workspace
) -> None:
    server = make_server(drain_seconds=WINDOW)
    services = server.services
    assert services is not None
    total = 3 * PER_KIND
    limits = httpx.Limits(max_connections=total + 10, max_keepalive_connections=total + 10)
    async with (
        httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as http,
        httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as late,
    ):
        call_id = await new_call(late, workspace)
        conversation_id = await new_conversation(http, server, workspace)
        clients = Clients(http, total)
        h = workspace.headers
        transcript = f"{server.url}/v1/calls/{call_id}/transcript/stream"
        conversation = f"{server.url}/v1/conversations/{conversation_id}/stream"
        streams = [
            *(clients.sse("transcript_sse", transcript, h) for _ in range(PER_KIND)),
            *(clients.sse("conversation_sse", conversation, h) for _ in range(PER_KIND)),
            *(clients.websocket(ws_url(server, call_id), h) for _ in range(PER_KIND)),
        ]
        tasks = [asyncio.create_task(stream) for stream in streams]
        await asyncio.wait_for(clients.all_open.wait(), TIMEOUT)
        await eventually(lambda: server.call(lambda: len(services.registry.streams)) == total)
        # A client with an idle keep-alive connection, which survives into the drain.
        assert (await late.get("/v1/workspace", headers=h)).status_code == 200

        started = time.monotonic()
        stopping = asyncio.get_running_loop().run_in_executor(None, server.stop)
        done, _ = await asyncio.wait(tasks, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        assert done, "no stream ended"

        # During the drain, a new connection is refused at once (the listener is closed)...
        port = int(server.url.rsplit(":", 1)[1])
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        # ...and a stream asked for on a connection that is still open ends at once, with a hint.
        newcomer = await asyncio.wait_for(
            Clients(late, 1).sse("transcript_sse", transcript, h), TIMEOUT
        )
        assert newcomer.code == "UNAVAILABLE" and newcomer.retry_ms is not None

        ended: list[Ended] = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
        await asyncio.wait_for(stopping, TIMEOUT)
        stopped = time.monotonic()

    # Every SSE client was told UNAVAILABLE with its own `retry:`, in [1 s, 1 s + window]...
    sse = [e for e in ended if e.kind != "call_websocket"]
    assert len(sse) == 2 * PER_KIND and {e.code for e in sse} == {"UNAVAILABLE"}
    sse_hints = [e.retry_ms for e in sse]
    assert all(h is not None and 1000 <= h <= 1000 + WINDOW * 1000 for h in sse_hints)
    assert len(set(sse_hints)) > PER_KIND
    # ...and every WebSocket got 1012 with its own suggested delay.
    sockets = [e for e in ended if e.kind == "call_websocket"]
    assert len(sockets) == PER_KIND and {e.code for e in sockets} == {1012}
    ws_hints = [e.retry_ms for e in sockets]
    assert all(h is not None and 1000 <= h <= 1000 + WINDOW * 1000 for h in ws_hints)
    assert len(set(ws_hints)) > PER_KIND // 2

    # The endings are spread over the window, not bunched at its start.
    times = sorted(e.at for e in ended)
    assert times[-1] - times[0] > WINDOW / 2, times
    early = sum(1 for t in times if t - times[0] < WINDOW / 10)
    assert early <= total / 3, f"{early} of {total} ended in the first tenth of the window"
    # The kinds are interleaved: no kind of stream is systematically last.
    last_third = [e.kind for e in sorted(ended, key=lambda e: e.at)[-total // 3 :]]
    assert len(set(last_third)) == 3

    # The shutdown finished, soon after the window.
    assert stopped - started < WINDOW + 5.0
    drained = services.metrics.counter("switchboard_streams_drained_total", "", "kind")
    assert sum(drained.values()) == total + 1
