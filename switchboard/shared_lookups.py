"""One read for every caller that asks the same question at once, and the answer remembered for
as long as its caller says it stays true.

A storm of requests that all miss a cache (a reconnect storm after a replica restarts, 5,000
stream opens with one key) would otherwise ask the database the same question once each, in
parallel, and grow every process's pool to its maximum: a Postgres backend, and its memory,
per question in flight."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

MAX_KEPT = 10_000  # answers kept per process; the oldest go first


class SharedLookups(Generic[K, V]):
    def __init__(
        self,
        read: Callable[[K], Awaitable[V]],
        keep_for: Callable[[V], float],
        clock: Callable[[], float],
        max_kept: int = MAX_KEPT,
    ) -> None:
        self.read = read
        self.keep_for = keep_for  # seconds an answer stays true enough (0: not kept)
        self.clock = clock
        self.max_kept = max_kept
        self._kept: OrderedDict[K, tuple[V, float]] = OrderedDict()
        self._reading: dict[K, asyncio.Future[V]] = {}
        self.reads = 0  # reads made (the rest were answered by a read or an answer kept)

    async def get(self, key: K) -> V:
        while True:
            kept = self._kept.get(key)
            if kept is not None:
                value, until = kept
                if self.clock() < until:
                    return value
                del self._kept[key]
            reading = self._reading.get(key)
            if reading is None:
                return await self._read(key)
            try:
                return await asyncio.shield(reading)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if reading.cancelled() and task is not None and not task.cancelling():
                    continue  # the open that was reading left: read again for this one
                raise

    async def _read(self, key: K) -> V:
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._reading[key] = future
        try:
            self.reads += 1
            value = await self.read(key)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as failure:
            # The opens waiting on this read fail as it did (an outage is a 503 for each).
            future.set_exception(failure)
            future.exception()  # retrieved, so a failure nobody waited on is not logged
            raise
        finally:
            del self._reading[key]
        future.set_result(value)
        self._keep(key, value)
        return value

    def _keep(self, key: K, value: V) -> None:
        seconds = self.keep_for(value)
        if seconds <= 0:
            return
        self._kept[key] = (value, self.clock() + seconds)
        self._kept.move_to_end(key)
        while len(self._kept) > self.max_kept:
            self._kept.popitem(last=False)


def never_kept(_value: object) -> float:
    """For a caller that keeps its own answers and wants only the shared read."""
    return 0.0
