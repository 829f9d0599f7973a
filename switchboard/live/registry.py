"""The open streams of this replica: so a revoked key ends its streams at once, an expiring
stream token ends its streams on time, idle SSE streams get their heartbeat, a client that has
stopped reading is cut off, and a shutdown drains every stream with its terminal frame before
the server stops: spread over a window, each client told to come back after its own delay, so
that a replica's clients do not all reconnect in the same instant.

One ticker serves every stream, instead of a timer per stream per wait: at thousands of
streams, per-wait timers were a tenth of the server's CPU."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from switchboard.live.frames import Ending, Terminal
from switchboard.live.metrics import Metrics
from switchboard.live.outbox import Outbox

log = logging.getLogger(__name__)

MAX_TICK = 1.0  # seconds; also the precision of stream-token expiry
STALL_INTERVALS = 2  # heartbeat intervals a write may wait on the client before it is cut off
DRAIN_STEP = 0.05  # seconds between two batches of a drain
RETRY_FLOOR = 1.0  # seconds a drained client waits at least, so the balancer can notice the drain


def drain_schedule(
    count: int, window: float, rng: random.Random, step: float = DRAIN_STEP
) -> list[float]:
    """When each of `count` streams ends, in seconds from the start of a drain.

    Batches come every `step` (the window divided evenly), as many as there are streams but no
    more than fit in the window: a few streams end one per batch within a fraction of a second
    (spreading them over the whole window would only delay the stop), and 10,000 end 100 at a
    time over the whole window. The batches differ in size by one at most, and the order is
    shuffled so that no client is systematically last."""
    if count <= 0:
        return []
    slots = max(1, int(window / step + 1e-9))
    interval = window / slots
    batches = min(count, slots)
    offsets = [interval * (i * batches // count) for i in range(count)]
    rng.shuffle(offsets)
    return offsets


def drain_retry_ms(window: float, rng: random.Random) -> int:
    """The reconnect delay suggested to one drained client: uniform in [1 s, 1 s + window], so
    that clients that end together (a batch, or streams refused during the drain) still come
    back spread out."""
    return round(1000 * (RETRY_FLOOR + rng.uniform(0, window)))


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
    def __init__(
        self,
        metrics: Metrics,
        heartbeat_interval: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.metrics = metrics
        self.heartbeat_interval = heartbeat_interval
        self.streams: dict[Outbox, OpenStream] = {}
        self.draining = False
        self.drain_window = 0.0
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self.stalled = metrics.counter(
            "switchboard_streams_stalled_total",
            "Streams cut off because their client accepted no bytes for two heartbeat intervals.",
            "kind",
        )
        self.drained = metrics.counter(
            "switchboard_streams_drained_total",
            "Streams ended by a drain (shutdown), told to reconnect elsewhere.",
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
            self.drained[kind] += 1
            outbox.end_now(Terminal(Ending.DRAINING, drain_retry_ms(self.drain_window, self.rng)))

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

    async def drain(self, window: float, grace: float) -> None:
        """Ends every stream with DRAINING, in batches spread over `window` seconds
        (`drain_schedule`), then waits at most `grace` seconds for them to finish. A stream that
        opens meanwhile is ended at once. Cancelled (a second Ctrl-C), it ends the rest at once.

        Each stream ends after the frames already queued for it: it stays live until its turn,
        and what it has been given it need not fetch again when it resumes elsewhere."""
        self.draining = True
        self.drain_window = window
        loop = asyncio.get_running_loop()
        started = loop.time()
        outboxes = list(self.streams)
        batches: dict[float, list[Outbox]] = defaultdict(list)
        for outbox, offset in zip(
            outboxes, drain_schedule(len(outboxes), window, self.rng), strict=True
        ):
            batches[offset].append(outbox)
        if outboxes:
            log.info("draining %d streams over %.1f s", len(outboxes), max(batches))
        try:
            for offset in sorted(batches):
                delay = started + offset - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                for outbox in batches[offset]:
                    self._end_drained(outbox)
        finally:
            for outbox in list(self.streams):
                self._end_drained(outbox)
        try:
            async with asyncio.timeout(grace):
                await self._empty.wait()
        except TimeoutError:
            log.warning(
                "%d streams had not finished %.1f s after the drain", len(self.streams), grace
            )

    def _end_drained(self, outbox: Outbox) -> None:
        """Ends a stream that is still open and still live; one that is ending already (its call
        completed, its key revoked) keeps its own ending."""
        stream = self.streams.get(outbox)
        if stream is None or outbox.terminal is not None or outbox.aborted:
            return
        self.drained[stream.kind] += 1
        outbox.end(Terminal(Ending.DRAINING, drain_retry_ms(self.drain_window, self.rng)))
