"""Reads of many items of one group made as one read: while a group's read is under way, the
items asked for meanwhile wait together, and the next read asks for all of them.

An open storm asks for the status of every call its streams follow (50 calls for 5,000
streams at 100 a call). Asked one by one, each question is a transaction of its own and
holds a pooled connection while it waits, so the storm grows every process's pool to its
bound, a Postgres backend each. Batched, a workspace's questions hold one connection at a
time, in as few transactions as the storm has waves.

A group is what one read may cover (here a workspace: the read runs under its row-level
security). At most one read per group is under way; different groups read side by side."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Hashable, Mapping
from typing import Generic, TypeVar

G = TypeVar("G", bound=Hashable)
I = TypeVar("I", bound=Hashable)  # noqa: E741
V = TypeVar("V")


class BatchedReads(Generic[G, I, V]):
    def __init__(
        self,
        read_many: Callable[[G, Collection[I]], Awaitable[Mapping[I, V]]],
        missing: V,
    ) -> None:
        self.read_many = read_many  # the found items' values; an item left out is `missing`
        self.missing = missing
        self._waiting: dict[G, dict[I, asyncio.Future[V]]] = {}
        self._readers: dict[G, asyncio.Task[None]] = {}
        self.reads = 0

    async def read(self, group: G, item: I) -> V:
        waiting = self._waiting.setdefault(group, {})
        future = waiting.get(item)
        if future is None:
            future = waiting[item] = asyncio.get_running_loop().create_future()
        if group not in self._readers:
            self._readers[group] = asyncio.create_task(self._read_group(group))
        # Shielded: one caller leaving must not cancel the answer others wait on.
        return await asyncio.shield(future)

    async def _read_group(self, group: G) -> None:
        try:
            # One turn of the loop first, so that the opens that arrived together read together.
            await asyncio.sleep(0)
            while batch := self._waiting.pop(group, None):
                await self._read_batch(group, batch)
        finally:
            del self._readers[group]
            for future in self._waiting.pop(group, {}).values():
                future.cancel()  # only when this reader itself was cancelled (shutdown)

    async def _read_batch(self, group: G, batch: dict[I, asyncio.Future[V]]) -> None:
        self.reads += 1
        try:
            found = await self.read_many(group, list(batch))
        except asyncio.CancelledError:
            for future in batch.values():
                future.cancel()
            raise
        except Exception as failure:
            # Every item of the batch fails as the read did (an outage is a 503 for each open).
            for future in batch.values():
                if not future.done():
                    future.set_exception(failure)
                    future.exception()  # retrieved: a failure nobody waited on is not logged
            return
        for item, future in batch.items():
            if not future.done():
                future.set_result(found.get(item, self.missing))
