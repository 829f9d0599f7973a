"""The open streams of this replica: so a revoked key ends its streams at once, an expiring
stream token ends its streams on time, idle SSE streams get their heartbeat, a client that has
stopped reading is cut off, and a shutdown drains every stream with its terminal frame before
the server stops.

One ticker serves every stream, instead of a timer per stream per wait: at thousands of
streams, per-wait timers were a tenth of the server's CPU."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from switchboard.live.frames import Ending, Terminal
from switchboard.live.metrics import Metrics
from switchboard.live.outbox import Outbox

log = logging.getLogger(__name__)

MAX_TICK = 1.0  # seconds; also the precision of stream-token expiry
STALL_INTERVALS = 2  # heartbeat intervals a write may wait on the client before it is cut off


@dataclass(frozen=True)
class OpenStream:
    kind: str
    key_id: str
    expires_at: float | None  # Unix seconds, for streams opened with a stream token
    heartbeats: bool  # SSE streams; WebSocket keep-alive is the server's ping/pong
    # Drops the client's connection at once. A writer stuck in `send` on a client that reads
    # nothing cannot act itself; the ticker calls this for it (see `tick`).
    hang_up: Callable[[], object] | None


class StreamRegistry:
    def __init__(self, metrics: Metrics, heartbeat_interval: float = 30.0) -> None:
        self.metrics = metrics
        self.heartbeat_interval = heartbeat_interval
        self.streams: dict[Outbox, OpenStream] = {}
        self.draining = False
        self.stalled = metrics.counter(
            "switchboard_streams_stalled_total",
            "Streams cut off because their client accepted no bytes for two heartbeat intervals.",
            "kind",
        )
        self._empty = asyncio.Event()
        self._empty.set()

    def add(
        self,
        outbox: Outbox,
        kind: str,
        key_id: str,
        *,
        expires_at: float | None = None,
        heartbeats: bool = False,
        hang_up: Callable[[], object] | None = None,
    ) -> None:
        self.streams[outbox] = OpenStream(kind, key_id, expires_at, heartbeats, hang_up)
        self.metrics.open_streams[kind] += 1
        outbox.last_write = asyncio.get_running_loop().time()
        self._empty.clear()
        if self.draining:
            outbox.end_now(Terminal(Ending.DRAINING))

    def remove(self, outbox: Outbox) -> None:
        stream = self.streams.pop(outbox, None)
        if stream is not None:
            self.metrics.open_streams[stream.kind] -= 1
        if not self.streams:
            self._empty.set()

    def end_for_key(self, key_id: str) -> int:
        ended = 0
        for outbox, stream in list(self.streams.items()):
            if stream.key_id == key_id:
                outbox.end_now(Terminal(Ending.REVOKED))
                ended += 1
        return ended

    def tick(self, loop_now: float, wall_now: float) -> None:
        """Heartbeats for idle SSE streams, the end of streams whose token expired, and the
        hang-up of streams whose client has accepted nothing for two heartbeat intervals."""
        stall_after = STALL_INTERVALS * self.heartbeat_interval
        for outbox, stream in list(self.streams.items()):
            writing_since = outbox.writing_since
            if writing_since is not None and loop_now - writing_since >= stall_after:
                if not outbox.aborted:
                    self._hang_up(outbox, stream)
            elif stream.expires_at is not None and wall_now >= stream.expires_at:
                outbox.end_now(Terminal(Ending.TOKEN_EXPIRED))
            elif stream.heartbeats and loop_now - outbox.last_write >= self.heartbeat_interval:
                outbox.last_write = loop_now
                outbox.request_heartbeat()

    def _hang_up(self, outbox: Outbox, stream: OpenStream) -> None:
        """A write has waited on the client for two intervals: its socket buffers are full and
        it reads nothing. No close frame or terminal could reach it (it would queue behind the
        unread bytes), so the connection is dropped; the writer's `send` then returns, and the
        stream unwinds and frees its subscription, outbox and tasks as on any disconnect."""
        self.stalled[stream.kind] += 1
        log.debug("cut off a %s client that stopped reading", stream.kind)
        outbox.abort()
        if stream.hang_up is not None:
            stream.hang_up()

    async def run_ticker(self) -> None:
        loop = asyncio.get_running_loop()
        period = min(MAX_TICK, self.heartbeat_interval / 3)
        while True:
            await asyncio.sleep(period)
            self.tick(loop.time(), time.time())

    async def drain(self, grace: float) -> None:
        """Ends every stream with DRAINING; waits at most `grace` seconds for them to finish."""
        self.draining = True
        for outbox in list(self.streams):
            outbox.end_now(Terminal(Ending.DRAINING))
        try:
            async with asyncio.timeout(grace):
                await self._empty.wait()
        except TimeoutError:
            pass
