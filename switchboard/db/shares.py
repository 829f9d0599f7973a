"""How many of a process's pooled connections one workspace may hold at once.

The pool is small (`SWITCHBOARD_DATABASE_POOL_SIZE`, 8 by default) and shared by every
workspace a process serves. Without a bound, one workspace's burst (a flood of requests, a
storm of slow list pages) takes every connection, and another workspace's one request waits in
the pool's queue behind all of it. With a share of the pool size less three (the outbox relay
may hold one for good), a workspace's transactions beyond its share wait on their own
workspace's turn, and two connections are always left for the others. A share is held only
while a workspace's transaction is; the gate is forgotten when nobody holds or awaits it, so
idle workspaces cost nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

LEFT_FOR_OTHERS = 2
HELD_BY_THE_RELAY = 1  # the outbox relay's session (bus/event_outbox.py)


def share_of(pool_size: int) -> int:
    return max(1, pool_size - HELD_BY_THE_RELAY - LEFT_FOR_OTHERS)


class WorkspaceShares:
    def __init__(self, share: int) -> None:
        self.share = share
        self._gates: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}

    @asynccontextmanager
    async def turn(self, workspace_id: str) -> AsyncIterator[None]:
        """Waits until `workspace_id` holds fewer than its share, and holds one until exit."""
        entry = self._gates.get(workspace_id)
        if entry is None:
            entry = self._gates[workspace_id] = (asyncio.Semaphore(self.share), [0])
        gate, users = entry
        users[0] += 1  # holding or waiting: the gate lives while this is above zero
        try:
            async with gate:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._gates[workspace_id]

    def gates(self) -> int:
        """Workspaces holding or awaiting a share now (for tests and metrics)."""
        return len(self._gates)
