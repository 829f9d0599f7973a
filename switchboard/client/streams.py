"""The client's streams (see the package docstring)."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from switchboard.client.sse import sse_events

RECONNECTABLE_CODES = ("UNAVAILABLE", "INTERNAL")  # drain or a server fault: try elsewhere
RECONNECTABLE_CLOSES = (1011, 1012)


class StreamError(Exception):
    """A terminal error the stream will not retry (bad key, revoked key, unknown id...)."""

    def __init__(self, error_code: str, message: str) -> None:
        super().__init__(f"{error_code}: {message}")
        self.error_code = error_code


class StreamClosed(Exception):
    """Gave up reconnecting after `max_attempts` failures in a row."""


class SwitchboardClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        heartbeat_timeout: float = 75.0,  # 2.5 x the server's 30 s heartbeat
        max_backoff: float = 30.0,
        max_attempts: int = 10,
        rng: random.Random | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.heartbeat_timeout = heartbeat_timeout
        self.max_backoff = max_backoff
        self.max_attempts = max_attempts
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self.connections = 0  # how many times a stream (re)connected, for callers' metrics
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(10.0, read=None),
        )

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

    # --- SSE --------------------------------------------------------------------------------------

    def transcript(self, call_id: str) -> AsyncIterator[dict[str, Any]]:
        """Turns of a live call, partial and final, until the call ends."""
        return self._sse(f"/v1/calls/{call_id}/transcript/stream")

    def conversation(self, conversation_id: str) -> AsyncIterator[dict[str, Any]]:
        """Envelopes of a conversation, forever (or until a terminal error)."""
        return self._sse(f"/v1/conversations/{conversation_id}/stream")

    async def _sse(self, path: str) -> AsyncIterator[dict[str, Any]]:
        failures = 0
        while True:
            try:
                async with self.http.stream("GET", path) as response:
                    if response.status_code == 204:
                        return  # the call has already ended
                    if response.status_code != 200:
                        body = orjson.loads(await response.aread())
                        raise StreamError(body["error_code"], body["message"])
                    self.connections += 1
                    failures = 0
                    events = sse_events(response)
                    while True:
                        async with asyncio.timeout(self.heartbeat_timeout):
                            event = await anext(events)
                        if event.comment is not None or event.data is None:
                            continue
                        if event.event == "end":
                            return
                        if event.event == "error":
                            error = orjson.loads(event.data)
                            if error["error_code"] not in RECONNECTABLE_CODES:
                                raise StreamError(error["error_code"], error["message"])
                            break  # drained: reconnect, perhaps to another replica
                        yield orjson.loads(event.data)
            except (httpx.TransportError, TimeoutError, StopAsyncIteration):
                pass  # dropped, or silent past the heartbeat timeout: reconnect
            failures += 1
            if failures > self.max_attempts:
                raise StreamClosed(f"{path}: {self.max_attempts} reconnects failed in a row")
            await asyncio.sleep(self.backoff(failures))

    # --- WebSocket --------------------------------------------------------------------------------

    def call_events(self, call_id: str) -> CallSocket:
        return CallSocket(self, call_id)


class CallSocket:
    """`async with client.call_events(call_id) as call:` then `async for event in call` and
    `await call.send_dtmf("12#")`. Reconnects on drain (1012), internal errors (1011) and dropped
    connections; ends on 1000; raises StreamError on 1008 and refused upgrades."""

    def __init__(self, client: SwitchboardClient, call_id: str) -> None:
        self.client = client
        self.url = client.base_url.replace("http", "ws", 1) + f"/v1/calls/{call_id}/stream"
        self._socket: ClientConnection | None = None
        self._results: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._seen: set[str] = set()  # event ids, so a reconnect's replayed history is not repeated

    async def __aenter__(self) -> CallSocket:
        await self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._socket is not None:
            await self._socket.close()

    async def _connect(self) -> None:
        failures = 0
        while True:
            try:
                self._socket = await ws_connect(
                    self.url,
                    additional_headers={"Authorization": f"Bearer {self.client.api_key}"},
                    ping_interval=None,  # the server pings; we answer
                )
                self.client.connections += 1
                return
            except InvalidStatus as refused:
                body = orjson.loads(refused.response.body or b'{"error_code": "?", "message": "?"}')
                raise StreamError(body["error_code"], body["message"]) from None
            except OSError:
                failures += 1
                if failures > self.client.max_attempts:
                    raise StreamClosed(f"{self.url}: could not connect") from None
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

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._events()

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            assert self._socket is not None
            try:
                async with asyncio.timeout(self.client.heartbeat_timeout):
                    text = await self._socket.recv()
            except TimeoutError:
                await self._socket.close()
                await self._connect()
                continue
            except ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd else 1006
                if code == 1000:
                    return
                if code == 1008:
                    raise StreamError(
                        "UNAUTHENTICATED", closed.rcvd.reason if closed.rcvd else ""
                    ) from None
                if code not in (*RECONNECTABLE_CLOSES, 1006):
                    raise StreamError("CLOSED", f"closed with {code}") from None
                await self._connect()
                continue
            event = orjson.loads(text)
            if event.get("event_type") == "command.result":
                future = self._results.get(str(event.get("request_id")))
                if future is not None and not future.done():
                    future.set_result(event)
                continue
            event_id = event.get("event_id")
            if event_id in self._seen:
                continue
            self._seen.add(event_id)
            yield event
