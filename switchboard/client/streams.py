"""The client's streams (see the package docstring): the I/O around `resume.py`'s bookkeeping."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from switchboard.client.environment import server_urls
from switchboard.client.resume import (
    RETRYABLE_STATUSES,
    End,
    Fail,
    Frame,
    Position,
    Reconnect,
    Reset,
    Resume,
    close_delay,
    error_of,
    socket_step,
    sse_step,
)
from switchboard.client.sse import sse_events

# 1001 going away and 1013 try again later come from proxies; 1006 is a dropped connection.
RECONNECTABLE_CLOSES = (1001, 1006, 1011, 1012, 1013)

OnReset = Callable[[str], None]


class StreamError(Exception):
    """A terminal error the stream will not retry (bad key, revoked key, unknown id...)."""

    def __init__(self, error_code: str, message: str) -> None:
        super().__init__(f"{error_code}: {message}")
        self.error_code = error_code


class StreamClosed(Exception):
    """Gave up reconnecting after `max_attempts` failures in a row."""


class SwitchboardClient:
    """One API key, one or more base URLs (replicas, or load balancers in front of them): a
    stream that cannot connect, or whose server drains, goes on with the next URL."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        api_key: str,
        *,
        heartbeat_timeout: float = 75.0,  # 2.5 x the server's 30 s heartbeat
        max_backoff: float = 30.0,
        max_attempts: int = 10,
        rng: random.Random | None = None,
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("SwitchboardClient needs at least one base URL")
        self.base_urls = tuple(url.rstrip("/") for url in urls)
        self.base_url = self.base_urls[0]
        self.api_key = api_key
        self.heartbeat_timeout = heartbeat_timeout
        self.max_backoff = max_backoff
        self.max_attempts = max_attempts
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self.connections = 0  # how many times a stream (re)connected, for callers' metrics
        self.preferred = 0  # the base URL that last accepted a stream: new streams start there
        self.http = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(10.0, read=None),
        )

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> SwitchboardClient:
        """The servers in `SWITCHBOARD_URL` (default: the local one) and the key in
        `SWITCHBOARD_API_KEY`."""
        environ = os.environ if env is None else env
        return cls(server_urls(environ.get("SWITCHBOARD_URL", "")), environ["SWITCHBOARD_API_KEY"])

    async def __aenter__(self) -> SwitchboardClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.http.aclose()

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, 0.5 * 2**attempt)] seconds."""
        return self.rng.uniform(0, min(self.max_backoff, 0.5 * 2**attempt))

    def url(self, index: int) -> str:
        return self.base_urls[index % len(self.base_urls)]

    # --- SSE --------------------------------------------------------------------------------------

    def transcript(
        self,
        call_id: str,
        *,
        from_start: bool = False,
        last_event_id: str | None = None,
        on_reset: OnReset | None = None,
    ) -> SseStream:
        """Turns of a call, partial and final, until the call ends. With `from_start`, every
        final turn so far first (and a call that has ended gives its turns, then ends);
        `last_event_id` resumes from a cursor kept from an earlier stream."""
        position = Position(cursor=last_event_id, from_start=from_start)
        return SseStream(self, f"/v1/calls/{call_id}/transcript/stream", {}, position, on_reset)

    def conversation(
        self,
        conversation_id: str,
        *,
        last_event_id: str | None = None,
        on_reset: OnReset | None = None,
    ) -> SseStream:
        """Envelopes of a conversation, forever (or until a terminal error)."""
        position = Position(cursor=last_event_id)
        path = f"/v1/conversations/{conversation_id}/stream"
        return SseStream(self, path, {}, position, on_reset)

    def events(
        self,
        event_types: Iterable[str] | None = None,
        *,
        last_event_id: str | None = None,
        on_reset: OnReset | None = None,
    ) -> SseStream:
        """Envelopes of the whole workspace, forever; `event_types` filters them (a trailing
        `*` matches a prefix: `["call.completed", "message.*"]`)."""
        types = [event_types] if isinstance(event_types, str) else list(event_types or ())
        query = {"event_types": ",".join(types)} if types else {}
        return SseStream(self, "/v1/events/stream", query, Position(cursor=last_event_id), on_reset)

    # --- WebSocket --------------------------------------------------------------------------------

    def call_events(
        self,
        call_id: str,
        *,
        last_event_id: str | None = None,
        on_reset: OnReset | None = None,
    ) -> CallSocket:
        return CallSocket(self, call_id, Position(cursor=last_event_id), on_reset)

    async def listen(self, call_id: str) -> AsyncGenerator[bytes, None]:
        """The call's live audio, chunk by chunk, until the call ends: each chunk is 20 ms of
        16 kHz mono signed 16-bit little-endian PCM (640 bytes), caller and agent mixed. A
        reconnect listens again by itself; audio while disconnected is not replayed."""
        async with self.call_events(call_id) as call:
            async for chunk in call.listen():
                yield chunk


class SseStream:
    """An async iterator over one SSE stream's frames that reconnects and resumes by itself:
    every reconnect sends `Last-Event-ID` with the cursor of the last frame received, a `gap`
    reconnects at once to get the dropped frames back, and a `reset` is counted in
    `position.resets` and passed to `on_reset`. Ends on 204 and `event: end`."""

    def __init__(
        self,
        client: SwitchboardClient,
        path: str,
        query: dict[str, str],
        position: Position,
        on_reset: OnReset | None,
    ) -> None:
        self.client = client
        self.path = path
        self.query = query
        self.position = position
        self.on_reset = on_reset
        self._frames = self._run()

    @property
    def cursor(self) -> str | None:
        """The cursor to keep to resume this stream later (`last_event_id=`)."""
        return self.position.cursor

    def __aiter__(self) -> SseStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self._frames.__anext__()

    async def aclose(self) -> None:
        await self._frames.aclose()

    async def _run(self) -> AsyncGenerator[dict[str, Any], None]:
        client = self.client
        index = client.preferred
        failures = 0
        while True:
            resume_now = False
            delivered = False
            delay: float | None = None  # a draining server's own suggestion
            headers, query = self.position.sse_request()
            try:
                async with client.http.stream(
                    "GET",
                    client.url(index) + self.path,
                    params={**self.query, **query},
                    headers=headers,
                ) as response:
                    if response.status_code == 204:
                        return  # the call has already ended
                    if response.status_code != 200:
                        code, message = error_of(response.status_code, await response.aread())
                        if response.status_code not in RETRYABLE_STATUSES:
                            raise StreamError(code, message)
                    else:
                        client.connections += 1
                        client.preferred = index
                        failures = 0
                        events = sse_events(response)
                        while True:
                            async with asyncio.timeout(client.heartbeat_timeout):
                                event = await anext(events)
                            step = sse_step(self.position, event)
                            if isinstance(step, Frame):
                                delivered = True
                                yield step.data
                            elif isinstance(step, End):
                                return
                            elif isinstance(step, Fail):
                                raise StreamError(step.error_code, step.message)
                            elif isinstance(step, Reset):
                                if self.on_reset is not None:
                                    self.on_reset(step.reason)
                            elif isinstance(step, Resume):
                                resume_now = True
                                break
                            elif isinstance(step, Reconnect):
                                delay = step.delay
                                break  # drained: go on elsewhere
            except (httpx.TransportError, TimeoutError, StopAsyncIteration):
                pass  # dropped, or silent past the heartbeat timeout: reconnect
            if resume_now and delivered:
                continue  # a gap: the same server has the dropped frames, at once
            failures += 1
            if failures > client.max_attempts:
                raise StreamClosed(f"{self.path}: {client.max_attempts} reconnects failed in a row")
            if not resume_now:  # a gap with no frame before it is no fault of the server's
                index += 1
            await asyncio.sleep(client.backoff(failures) if delay is None else delay)


class CallSocket:
    """`async with client.call_events(call_id) as call:` then `async for event in call` and
    `await call.send_dtmf("12#")`. Reconnects on drain (1012), internal errors (1011) and dropped
    connections, each time with `?last_event_id=` of the last envelope yielded; a `stream.gap`
    reconnects at once from its `resume_from`, a `stream.reset` is counted in `position.resets`
    and passed to `on_reset`. Ends on 1000; raises StreamError on 1008 and refused upgrades.

    `async for chunk in call.listen()` instead yields the call's live audio (SPEC 5.3), PCM
    chunk by chunk, until the call ends or `unlisten()`; the socket keeps its events' cursor
    meanwhile. One iteration at a time: the events or the audio."""

    def __init__(
        self,
        client: SwitchboardClient,
        call_id: str,
        position: Position | None = None,
        on_reset: OnReset | None = None,
    ) -> None:
        self.client = client
        self.path = f"/v1/calls/{call_id}/stream"
        self.position = position or Position()
        self.on_reset = on_reset
        self._index = client.preferred
        self._socket: ClientConnection | None = None
        self._results: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        # The request_id of the listen sent on this connection (every connection sends its
        # own while listening), and of an unlisten whose result ends the audio iterator.
        self._listen_request: str | None = None
        self._unlisten_request: str | None = None

    @property
    def cursor(self) -> str | None:
        return self.position.cursor

    @property
    def url(self) -> str:
        """The WebSocket URL of the next connection, cursor included."""
        base = self.client.url(self._index).replace("http", "ws", 1) + self.path
        query = self.position.socket_query()
        return f"{base}?{urlencode(query)}" if query else base

    async def __aenter__(self) -> CallSocket:
        await self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._socket is not None:
            await self._socket.close()

    async def _connect(self, *, after_failure: bool = False, delay: float | None = None) -> None:
        """Connects, to the next server after a failure, waiting `delay` (a draining server's
        suggestion) or else a full-jitter backoff first."""
        failures = 0
        if after_failure:
            failures = 1
            self._index += 1
            await asyncio.sleep(self.client.backoff(failures) if delay is None else delay)
        while True:
            try:
                self._socket = await ws_connect(
                    self.url,
                    additional_headers={"Authorization": f"Bearer {self.client.api_key}"},
                    ping_interval=None,  # the server pings; we answer
                )
                self.client.connections += 1
                self.client.preferred = self._index
                if self._listen_request is not None:
                    await self._send_listen()  # a new connection listens again
                return
            except InvalidStatus as refused:
                status = refused.response.status_code
                if status not in RETRYABLE_STATUSES:
                    body = bytes(refused.response.body or b"")
                    raise StreamError(*error_of(status, body)) from None
            except (OSError, InvalidHandshake, TimeoutError):
                pass  # refused, reset or cut during the handshake: try the next server
            failures += 1
            if failures > self.client.max_attempts:
                raise StreamClosed(f"{self.path}: could not connect") from None
            self._index += 1
            await asyncio.sleep(self.client.backoff(failures))

    async def send_dtmf(self, digits: str, timeout: float = 10.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Sends the digits and returns the `command.result` (ok or not) once it arrives; the
        result is delivered while something iterates the socket."""
        assert self._socket is not None
        request_id = f"dtmf-{next(self._ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._results[request_id] = future
        await self._socket.send(
            orjson.dumps(
                {"action": "send_dtmf", "digits": digits, "request_id": request_id}
            ).decode()
        )
        try:
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self._results.pop(request_id, None)

    def listen(self) -> AsyncIterator[bytes]:
        """Asks for the call's audio and yields it, 640 bytes (20 ms) a chunk, until the call
        ends or `unlisten()` is answered. Raises StreamError if the server refuses to listen."""
        return self._audio()

    async def unlisten(self) -> None:
        """Stops the audio; the iterator of `listen()` ends once the server has answered (no
        chunk follows that answer), so call it while that iterator runs in another task."""
        self._listen_request = None
        if self._socket is not None:
            request_id = f"unlisten-{next(self._ids)}"
            self._unlisten_request = request_id
            await self._command({"action": "unlisten", "request_id": request_id})

    async def _send_listen(self) -> None:
        request_id = f"listen-{next(self._ids)}"
        self._listen_request = request_id
        await self._command({"action": "listen", "request_id": request_id})

    async def _command(self, command: dict[str, str]) -> None:
        assert self._socket is not None
        with contextlib.suppress(ConnectionClosed):  # the reader sees the close and reconnects
            await self._socket.send(orjson.dumps(command).decode())

    async def _audio(self) -> AsyncIterator[bytes]:
        self._unlisten_request = None
        await self._send_listen()
        async for item in self._receive():
            if isinstance(item, bytes):
                if self._listen_request is not None:  # not those still on the way after unlisten
                    yield item
            elif item.get("event_type") == "command.result":
                request_id = item.get("request_id")
                if request_id == self._unlisten_request:
                    return
                if request_id == self._listen_request and item.get("ok") is not True:
                    self._listen_request = None
                    raise StreamError(
                        str(item.get("error_code") or "UNAVAILABLE"), str(item.get("message"))
                    )

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._events()

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        async for item in self._receive():
            if isinstance(item, dict) and item.get("event_type") != "command.result":
                yield item

    async def _receive(self) -> AsyncIterator[dict[str, Any] | bytes]:
        """Envelopes (each once), audio chunks and command results, across reconnects, until
        the call ends. Results of `send_dtmf` also settle its future here."""
        delivered = False  # since the last connect: a gap with no progress counts as a failure
        while True:
            socket = self._socket
            assert socket is not None
            try:
                async with asyncio.timeout(self.client.heartbeat_timeout):
                    text = await socket.recv()
            except TimeoutError:
                await socket.close()
                await self._connect(after_failure=True)
                delivered = False
                continue
            except ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd else 1006
                if code == 1000:
                    return
                if code == 1008:
                    raise StreamError(
                        "UNAUTHENTICATED", closed.rcvd.reason if closed.rcvd else ""
                    ) from None
                if code not in RECONNECTABLE_CLOSES:
                    raise StreamError("CLOSED", f"closed with {code}") from None
                reason = closed.rcvd.reason if closed.rcvd else ""
                await self._connect(after_failure=True, delay=close_delay(reason))
                delivered = False
                continue
            if isinstance(text, bytes):
                yield text  # audio: only a listening socket gets it
                continue
            message = orjson.loads(text)
            if not isinstance(message, dict):
                continue
            if message.get("event_type") == "command.result":
                future = self._results.get(str(message.get("request_id")))
                if future is not None and not future.done():
                    future.set_result(message)
                yield message
                continue
            step = socket_step(self.position, message)
            if isinstance(step, Frame):
                delivered = True
                yield step.data
            elif isinstance(step, Reset):
                if self.on_reset is not None:
                    self.on_reset(step.reason)
            elif isinstance(step, Resume):
                await socket.close()
                if not delivered:  # gap after gap with nothing between: not at full speed
                    await asyncio.sleep(self.client.backoff(1))
                await self._connect()
                delivered = False
