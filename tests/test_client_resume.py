"""The client's cursor bookkeeping (SPEC 5.4) against tiny SSE and WebSocket servers of the
test's own on 127.0.0.1: each records the cursor it is sent, and the test writes its answers
frame by frame: drops, drains, `gap` and `reset` frames, refusals, a second and third URL."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import random
import subprocess
import sys
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
from websockets.asyncio.server import Server, ServerConnection, serve

from switchboard.client import StreamError, SwitchboardClient
from switchboard.client.resume import (
    End,
    Fail,
    Frame,
    Position,
    Reconnect,
    Reset,
    Resume,
    Skip,
    close_delay,
    error_of,
    socket_step,
    sse_step,
)
from switchboard.client.sse import SseEvent
from switchboard.client.tail import tail

WAIT = 10.0
T = TypeVar("T")


async def wait(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, WAIT)


class Draws(random.Random):
    """Jitter of zero that remembers every backoff drawn, so a test can tell a reconnect that
    waited its turn from one that went at once."""

    def __init__(self) -> None:
        super().__init__(0)
        self.draws: list[float] = []

    def uniform(self, a: float, b: float) -> float:
        self.draws.append(b)
        return 0.0


def client(urls: str | list[str], rng: Draws | None = None) -> SwitchboardClient:
    return SwitchboardClient(urls, "pk_test_resume", rng=rng or Draws())


# --- the pure core --------------------------------------------------------------------------------


def test_the_cursor_moves_as_eventsource_moves_it() -> None:
    position = Position()
    assert position.sse_request() == ({}, {})
    assert sse_step(position, SseEvent(id="t1", data='{"text": "a"}')) == Frame({"text": "a"})
    assert sse_step(position, SseEvent(comment="keep-alive")) == Skip()
    assert position.sse_request() == ({"Last-Event-ID": "t1"}, {})
    assert sse_step(position, SseEvent(event="later", data="{}")) == Skip()  # a future kind
    assert position.cursor == "t1"
    sse_step(position, SseEvent(id="", data='{"text": "b"}'))  # an empty id clears it
    assert position.cursor is None


def test_a_gap_without_a_cursor_has_nothing_to_resume_from_except_the_start() -> None:
    live = Position()
    gap = SseEvent(event="gap", data='{"dropped": 3, "resume_from": null}')
    assert sse_step(live, gap) == Skip()
    assert (live.gaps, live.dropped) == (1, 3)
    assert sse_step(Position(from_start=True), gap) == Resume()
    assert socket_step(Position(), {"event_type": "stream.gap", "dropped": 1}) == Resume()


def test_terminal_frames_and_replays() -> None:
    position = Position()
    draining = SseEvent(event="error", data='{"error_code": "UNAVAILABLE", "message": "m"}')
    assert sse_step(position, draining) == Reconnect()
    revoked = SseEvent(event="error", data='{"error_code": "UNAUTHENTICATED", "message": "m"}')
    assert sse_step(position, revoked) == Fail("UNAUTHENTICATED", "m")
    assert sse_step(position, SseEvent(event="end", data="{}")) == End()
    assert sse_step(position, SseEvent(event="reset", data="not json")) == Reset("unknown")
    envelope = {"event_id": "evt_1", "event_type": "call.initiated"}
    assert socket_step(position, envelope) == Frame(envelope)
    assert socket_step(position, envelope) == Skip()  # replayed at a seam
    assert position.socket_query() == {"last_event_id": "evt_1"}
    assert error_of(502, b"<html>") == ("HTTP_502", "the server answered 502")


def test_a_drain_may_say_when_to_come_back() -> None:
    paced = SseEvent(event="error", data='{"error_code": "UNAVAILABLE"}', retry=2345)
    assert sse_step(Position(), paced) == Reconnect(2.345)
    assert close_delay("server draining; reconnect in 2345 ms") == 2.345
    assert close_delay("server draining; reconnect") is None
    assert close_delay("in x ms") is None


# --- a hand-driven SSE server ---------------------------------------------------------------------


def frame(cursor: str, text: str) -> bytes:
    body = {"role": "agent", "text": text, "is_final": True, "turn_id": f"trn_{cursor}", "ts": "t"}
    return b"id: %s\ndata: %s\n\n" % (cursor.encode(), orjson.dumps(body))


def named(event: str, data: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event.encode(), orjson.dumps(data))


@dataclass
class SseRequest:
    target: str
    headers: dict[str, str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query)

    @property
    def last_event_id(self) -> str | None:
        return self.headers.get("last-event-id")

    async def open(self) -> None:
        self.writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
            b"retry: 3000\n\n"
        )
        await self.writer.drain()

    async def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))
        await self.writer.drain()

    async def refuse(self, status: int, body: bytes) -> None:
        self.writer.write(
            b"HTTP/1.1 %d No\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, len(body), body)
        )
        await self.writer.drain()
        self.writer.close()

    def drop(self) -> None:
        """As a replica killed mid-stream: no terminal frame, the connection reset."""
        self.writer.transport.abort()

    async def left(self) -> None:
        """Returns once the client has closed its side."""
        while await self.reader.read(65536):
            pass


@dataclass
class SseServer:
    requests: asyncio.Queue[SseRequest] = field(default_factory=asyncio.Queue)
    url: str = ""
    _server: asyncio.Server | None = None
    _open: list[asyncio.StreamWriter] = field(default_factory=list)

    async def __aenter__(self) -> SseServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._open:
            writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.append(writer)
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        request_line, *lines = head.strip().split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        await self.requests.put(SseRequest(request_line.split()[1], headers, reader, writer))

    async def next(self) -> SseRequest:
        return await wait(self.requests.get())


async def dead_url() -> str:
    """A URL on which nothing listens: connections to it are refused."""
    async with SseServer() as gone:
        return gone.url


# --- SSE ------------------------------------------------------------------------------------------


async def test_a_dropped_sse_stream_resumes_from_the_id_of_the_last_frame() -> None:
    async with SseServer() as server, client(server.url) as sb:
        stream = sb.transcript("call_1")
        first = asyncio.create_task(anext(stream))
        request = await server.next()
        assert request.path == "/v1/calls/call_1/transcript/stream"
        assert request.last_event_id is None and request.query == {}
        assert request.headers["authorization"] == "Bearer pk_test_resume"
        await request.open()
        await request.send(b": keep-alive\n\n", frame("t1", "one"), frame("t2", "two"))
        assert (await wait(first))["text"] == "one"
        assert (await wait(anext(stream)))["text"] == "two"
        assert stream.cursor == "t2"
        request.drop()

        third = asyncio.create_task(anext(stream))
        again = await server.next()
        assert again.last_event_id == "t2"  # opaque: sent back exactly as received
        await again.open()
        await again.send(frame("t3", "three"), named("end", {"reason": "call_completed"}))
        assert (await wait(third))["text"] == "three"
        with pytest.raises(StopAsyncIteration):
            await wait(anext(stream))
        assert sb.connections == 2


async def test_a_gap_reconnects_at_once_from_resume_from_and_recovers_the_dropped_frames() -> None:
    rng = Draws()
    async with SseServer() as server, client(server.url, rng) as sb:
        stream = sb.conversation("conv_1")
        first = asyncio.create_task(anext(stream))
        request = await server.next()
        await request.open()
        await request.send(
            frame("e1", "one"),
            named("gap", {"dropped": 2, "resume_from": "e1"}),
            frame("e4", "four"),
        )
        assert (await wait(first))["text"] == "one"
        rest = asyncio.create_task(wait(_take(stream, 3)))
        again = await server.next()
        await wait(request.left())  # the client let go of the stream with the hole in it
        assert again.last_event_id == "e1"
        await again.open()
        await again.send(frame("e2", "two"), frame("e3", "three"), frame("e4", "four"))
        assert [item["text"] for item in await rest] == ["two", "three", "four"]
        assert (stream.position.gaps, stream.position.dropped) == (1, 2)
        assert rng.draws == []  # no backoff: the server is fine, the client was slow
        await stream.aclose()


async def test_a_gap_before_any_frame_backs_off_but_stays_with_its_server() -> None:
    rng = Draws()
    async with SseServer() as a, SseServer() as b, client([a.url, b.url], rng) as sb:
        stream = sb.conversation("conv_1", last_event_id="e3")
        first = asyncio.create_task(anext(stream))
        request = await a.next()
        await request.open()
        await request.send(named("gap", {"dropped": 5, "resume_from": "e3"}))
        request = await a.next()
        assert request.last_event_id == "e3" and len(rng.draws) == 1
        await request.open()
        await request.send(frame("e4", "four"))
        assert (await wait(first))["text"] == "four"
        await stream.aclose()


async def test_a_reset_is_reported_and_the_stream_goes_on_live() -> None:
    resets: list[str] = []
    async with SseServer() as server, client(server.url) as sb:
        stream = sb.transcript("call_1", last_event_id="t_kept", on_reset=resets.append)
        first = asyncio.create_task(anext(stream))
        request = await server.next()
        assert request.last_event_id == "t_kept"
        await request.open()
        await request.send(named("reset", {"reason": "cursor_expired"}), frame("t7", "live"))
        assert (await wait(first))["text"] == "live"
        assert resets == ["cursor_expired"] and stream.position.resets == ["cursor_expired"]
        assert stream.cursor == "t7"
        await stream.aclose()


async def test_from_start_is_asked_for_until_the_first_cursor_and_never_after() -> None:
    async with SseServer() as server, client(server.url) as sb:
        stream = sb.transcript("call_1", from_start=True)
        first = asyncio.create_task(anext(stream))
        request = await server.next()
        assert request.query == {"from": ["start"]} and request.last_event_id is None
        request.drop()  # before any frame: still nothing to resume from
        request = await server.next()
        assert request.query == {"from": ["start"]} and request.last_event_id is None
        await request.open()
        await request.send(frame("t1", "said before we came"))
        assert (await wait(first))["text"] == "said before we came"
        request.drop()
        second = asyncio.create_task(anext(stream))
        request = await server.next()
        assert request.query == {} and request.last_event_id == "t1"
        await request.open()
        await request.send(named("end", {"reason": "call_completed"}))
        with pytest.raises(StopAsyncIteration):
            await wait(second)


async def test_a_stream_goes_on_with_the_next_url_when_one_is_down_or_draining() -> None:
    rng = Draws()
    async with (
        SseServer() as a,
        SseServer() as b,
        client([await dead_url(), a.url + "/", b.url], rng) as sb,
    ):
        stream = sb.transcript("call_1")
        first = asyncio.create_task(anext(stream))
        request = await a.next()  # the first URL refused the connection
        assert request.path == "/v1/calls/call_1/transcript/stream"
        await request.open()
        await request.send(frame("t1", "one"))
        assert (await wait(first))["text"] == "one"
        draining = {"error_code": "UNAVAILABLE", "message": "The server is restarting."}
        await request.send(named("error", draining))
        second = asyncio.create_task(anext(stream))
        request = await b.next()
        assert request.last_event_id == "t1"
        await request.open()
        await request.send(frame("t2", "two"))
        assert (await wait(second))["text"] == "two"
        assert len(rng.draws) == 2  # each change of server waited a full-jitter backoff
        await stream.aclose()
        # The next stream starts where the last one was accepted.
        later = sb.conversation("conv_1")
        waiting = asyncio.create_task(anext(later))
        assert (await b.next()).path == "/v1/conversations/conv_1/stream"
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting


async def test_a_paced_drain_is_waited_out_as_the_server_asks() -> None:
    rng = Draws()
    async with SseServer() as a, SseServer() as b, client([a.url, b.url], rng) as sb:
        stream = sb.transcript("call_1")
        first = asyncio.create_task(anext(stream))
        request = await a.next()
        await request.open()
        await request.send(frame("t1", "one"))
        await wait(first)
        draining = {"error_code": "UNAVAILABLE", "message": "The server is restarting."}
        await request.send(b"retry: 5\n" + named("error", draining))
        second = asyncio.create_task(anext(stream))
        assert (await b.next()).last_event_id == "t1"
        assert rng.draws == []  # the server's jittered delay, not one of our own
        second.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await second


async def test_unavailable_at_open_tries_the_next_url_and_not_found_raises() -> None:
    async with SseServer() as a, SseServer() as b, client([a.url, b.url]) as sb:
        stream = sb.transcript("call_1", last_event_id="t5")
        first = asyncio.create_task(anext(stream))
        await (await a.next()).refuse(503, b'{"error_code": "UNAVAILABLE", "message": "bus down"}')
        request = await b.next()
        assert request.last_event_id == "t5"
        await request.refuse(502, b"<html>Bad Gateway</html>")  # a proxy's page
        request = await a.next()
        await request.refuse(404, b'{"error_code": "NOT_FOUND", "message": "no such call"}')
        with pytest.raises(StreamError) as refused:
            await wait(first)
        assert refused.value.error_code == "NOT_FOUND"


async def test_the_workspace_stream_filters_and_resumes_with_its_filter() -> None:
    async with SseServer() as server, client(server.url) as sb:
        stream = sb.events(["call.completed", "message.*"])
        first = asyncio.create_task(anext(stream))
        request = await server.next()
        assert request.path == "/v1/events/stream"
        assert request.query == {"event_types": ["call.completed,message.*"]}
        await request.open()
        await request.send(frame("e1", "one"))
        await wait(first)
        request.drop()
        second = asyncio.create_task(anext(stream))
        request = await server.next()
        assert request.query == {"event_types": ["call.completed,message.*"]}
        assert request.last_event_id == "e1"
        await request.open()
        await request.send(frame("e2", "two"))
        assert (await wait(second))["text"] == "two"
        await stream.aclose()


async def _take(stream: Any, count: int) -> list[dict[str, Any]]:
    return [await anext(stream) for _ in range(count)]


# --- a hand-driven WebSocket server ---------------------------------------------------------------


def envelope(event_id: str, event_type: str = "call.agent_response") -> str:
    return orjson.dumps(
        {"event_id": event_id, "event_type": event_type, "call_id": "call_1", "payload": {}}
    ).decode()


@dataclass
class SocketServer:
    connections: asyncio.Queue[ServerConnection] = field(default_factory=asyncio.Queue)
    url: str = ""
    _server: Server | None = None

    async def __aenter__(self) -> SocketServer:
        self._server = await serve(self._handle, "127.0.0.1", 0, ping_interval=None)
        self.url = f"http://127.0.0.1:{next(iter(self._server.sockets)).getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, connection: ServerConnection) -> None:
        await self.connections.put(connection)
        await connection.wait_closed()

    async def next(self) -> ServerConnection:
        return await wait(self.connections.get())


def query_of(connection: ServerConnection) -> dict[str, list[str]]:
    assert connection.request is not None
    return parse_qs(urlsplit(connection.request.path).query)


async def test_a_drained_socket_resumes_from_the_last_event_id_and_skips_a_replayed_one() -> None:
    async with SocketServer() as server, client(server.url) as sb:
        call = sb.call_events("call_1")
        entering = asyncio.create_task(call.__aenter__())
        connection = await server.next()
        assert query_of(connection) == {}
        await wait(entering)
        events = aiter(call)
        await connection.send(envelope("evt_1"))
        await connection.send(envelope("evt_2"))
        assert (await wait(anext(events)))["event_id"] == "evt_1"
        assert (await wait(anext(events)))["event_id"] == "evt_2"
        await connection.close(1012, "server draining; reconnect")
        third = asyncio.create_task(_take(events, 1))
        connection = await server.next()
        assert query_of(connection) == {"last_event_id": ["evt_2"]}
        await connection.send(envelope("evt_2"))  # an overlap at the seam stays harmless
        await connection.send(envelope("evt_3", "call.completed"))
        assert (await wait(third))[0]["event_id"] == "evt_3"
        await connection.close(1000, "call ended")
        with pytest.raises(StopAsyncIteration):
            await wait(anext(events))
        await call.__aexit__(None, None, None)


async def test_a_socket_gap_reconnects_at_once_from_resume_from() -> None:
    rng = Draws()
    async with SocketServer() as server, client(server.url, rng) as sb:
        call = sb.call_events("call_1", last_event_id="evt_0")
        entering = asyncio.create_task(call.__aenter__())
        connection = await server.next()
        assert query_of(connection) == {"last_event_id": ["evt_0"]}
        await wait(entering)
        events = aiter(call)
        await connection.send(envelope("evt_1"))
        gap = {"event_type": "stream.gap", "dropped": 2, "resume_from": "evt_1"}
        await connection.send(orjson.dumps(gap).decode())
        await connection.send(envelope("evt_4"))
        assert (await wait(anext(events)))["event_id"] == "evt_1"
        rest = asyncio.create_task(wait(_take(events, 3)))
        again = await server.next()
        assert query_of(again) == {"last_event_id": ["evt_1"]}
        await wait(connection.wait_closed())  # the client closed the socket with the hole
        for event_id in ("evt_2", "evt_3", "evt_4"):
            await again.send(envelope(event_id))
        assert [event["event_id"] for event in await rest] == ["evt_2", "evt_3", "evt_4"]
        assert (call.position.gaps, call.position.dropped, rng.draws) == (1, 2, [])
        await call.__aexit__(None, None, None)


async def test_a_socket_reset_is_reported_and_the_socket_goes_on() -> None:
    resets: list[str] = []
    async with SocketServer() as server, client(server.url) as sb:
        call = sb.call_events("call_1", last_event_id="evt_made_up", on_reset=resets.append)
        entering = asyncio.create_task(call.__aenter__())
        connection = await server.next()
        await wait(entering)
        reset = {"event_type": "stream.reset", "reason": "cursor_unknown"}
        await connection.send(orjson.dumps(reset).decode())
        await connection.send(envelope("evt_5"))
        assert (await wait(anext(aiter(call))))["event_id"] == "evt_5"
        assert resets == ["cursor_unknown"] and call.cursor == "evt_5"
        await call.__aexit__(None, None, None)


async def test_a_socket_goes_on_with_the_next_url_when_one_is_down_or_draining() -> None:
    async with (
        SocketServer() as a,
        SocketServer() as b,
        client([await dead_url(), a.url, b.url]) as sb,
    ):
        call = sb.call_events("call_1")
        entering = asyncio.create_task(call.__aenter__())
        connection = await a.next()
        await wait(entering)
        events = aiter(call)
        await connection.send(envelope("evt_1"))
        assert (await wait(anext(events)))["event_id"] == "evt_1"
        await connection.close(1012, "server draining; reconnect")
        second = asyncio.create_task(_take(events, 1))
        connection = await b.next()
        assert query_of(connection) == {"last_event_id": ["evt_1"]}
        await connection.send(envelope("evt_2"))
        assert (await wait(second))[0]["event_id"] == "evt_2"
        await call.__aexit__(None, None, None)


async def test_a_paced_socket_drain_is_waited_out_as_the_server_asks() -> None:
    rng = Draws()
    async with SocketServer() as a, SocketServer() as b, client([a.url, b.url], rng) as sb:
        call = sb.call_events("call_1")
        entering = asyncio.create_task(call.__aenter__())
        connection = await a.next()
        await wait(entering)
        events = aiter(call)
        await connection.send(envelope("evt_1"))
        assert (await wait(anext(events)))["event_id"] == "evt_1"
        await connection.close(1012, "server draining; reconnect in 5 ms")
        second = asyncio.create_task(_take(events, 1))
        connection = await b.next()
        assert query_of(connection) == {"last_event_id": ["evt_1"]}
        assert rng.draws == []
        await connection.send(envelope("evt_2"))
        assert (await wait(second))[0]["event_id"] == "evt_2"
        await call.__aexit__(None, None, None)


# --- switchboard tail -----------------------------------------------------------------------------


async def test_tail_resumes_and_says_when_the_server_could_not() -> None:
    out, err = Lines(), io.StringIO()
    async with SseServer() as server:
        tailing = asyncio.create_task(tail(server.url, "pk_test_resume", "call_1", out, err=err))
        request = await server.next()
        await request.open()
        await request.send(frame("t1", "Hello"))
        assert await wait(out.writes.get()) == "agent: Hello\n"
        request.drop()
        request = await server.next()
        assert request.last_event_id == "t1"
        await request.open()
        await request.send(
            named("reset", {"reason": "cursor_expired"}),
            frame("t9", "Goodbye"),
            named("end", {"reason": "call_completed"}),
        )
        await wait(tailing)
    assert out.getvalue() == "agent: Hello\nagent: Goodbye\n-- call ended\n"
    assert "cursor_expired" in err.getvalue()


class Lines(io.StringIO):
    """An output that tells a waiting test what was written."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: asyncio.Queue[str] = asyncio.Queue()

    def write(self, text: str) -> int:
        self.writes.put_nowait(text)
        return super().write(text)


async def test_tail_command_follows_the_workspace_across_replicas() -> None:
    async with SseServer() as a, SseServer() as b:
        env = {**os.environ, "SWITCHBOARD_API_KEY": "pk_test_resume"}
        args = ["--url", a.url, "--url", b.url, "--event-types", "call.completed,message.*"]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "switchboard",
            "tail",
            "events",
            *args,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            request = await a.next()
            assert request.path == "/v1/events/stream"
            assert request.query == {"event_types": ["call.completed,message.*"]}
            await request.open()
            first = {"event_id": "evt_1", "event_type": "call.completed", "call_id": "call_1"}
            await request.send(b"id: c1\ndata: %s\n\n" % orjson.dumps(first))
            assert "call_1 call.completed" in (await wait(process.stdout.readline())).decode()
            await request.send(named("error", {"error_code": "UNAVAILABLE", "message": "drain"}))
            request = await b.next()
            assert request.last_event_id == "c1"
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()
