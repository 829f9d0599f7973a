"""The open streams of this replica: so a revoked key ends its streams at once, and a shutdown
drains every stream with its terminal frame before the server stops."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from switchboard.live.frames import Ending, Terminal
from switchboard.live.metrics import Metrics
from switchboard.live.outbox import Outbox


@dataclass(frozen=True)
class OpenStream:
    kind: str
    key_id: str


class StreamRegistry:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.streams: dict[Outbox, OpenStream] = {}
        self.draining = False
        self._empty = asyncio.Event()
        self._empty.set()

    def add(self, outbox: Outbox, kind: str, key_id: str) -> None:
        self.streams[outbox] = OpenStream(kind, key_id)
        self.metrics.open_streams[kind] += 1
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
