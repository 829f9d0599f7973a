"""What a pooled connection carries from one use to the next (db/database.py): a request's
connection is handed back without a reset round trip, so nothing it did may outlive its
transaction; a connection that took session state is reset in full. Real Postgres, and a pool
of one connection, so that every use is the same connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from switchboard.db import Database, connect_database
from tests.harness import Workspace

LOCK_KEY = 4242


@pytest.fixture
async def one_connection(database_url: str) -> AsyncIterator[Database]:
    database = await connect_database(database_url, min_size=1, max_size=1)
    try:
        yield database
    finally:
        await database.close()


async def backend_pid(database: Database) -> int:
    async with database.pool.acquire() as conn:
        pid: int = await conn.fetchval("SELECT pg_backend_pid()")
    return pid


async def test_a_workspace_transaction_leaves_nothing_on_its_connection(
    one_connection: Database, workspace: Workspace
) -> None:
    pid = await backend_pid(one_connection)
    async with one_connection.workspace(workspace.id) as conn:
        assert await conn.fetchval("SELECT current_setting('app.workspace_id')") == workspace.id
    async with one_connection.pool.acquire() as conn:
        assert await conn.fetchval("SELECT pg_backend_pid()") == pid  # the same connection
        assert not await conn.fetchval("SELECT current_setting('app.workspace_id', true)")


async def test_a_transaction_cut_off_midway_is_rolled_back_before_the_next_use(
    one_connection: Database, workspace: Workspace
) -> None:
    entered = asyncio.Event()

    async def interrupted() -> None:
        async with one_connection.workspace(workspace.id) as conn:
            await conn.execute("UPDATE workspaces SET name = 'changed' WHERE id = $1", workspace.id)
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(interrupted())
    await asyncio.wait_for(entered.wait(), 5.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with one_connection.workspace(workspace.id) as conn:
        name = await conn.fetchval("SELECT name FROM workspaces WHERE id = $1", workspace.id)
    assert name == "workspace A"


async def test_a_sessions_lock_and_listen_are_released_when_it_is_handed_back(
    one_connection: Database, database_url: str
) -> None:
    pid = await backend_pid(one_connection)
    async with one_connection.session() as conn:
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY)
        await conn.execute("LISTEN switchboard_test")
    async with one_connection.pool.acquire() as conn:
        assert await conn.fetchval("SELECT pg_backend_pid()") == pid
        assert await conn.fetch("SELECT pg_listening_channels()") == []
    other = await asyncpg.connect(database_url)
    try:
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY)
    finally:
        await other.close()


async def test_one_workspace_cannot_take_every_connection_from_the_others(
    database_url: str, workspace: Workspace, other_workspace: Workspace
) -> None:
    """A pool of 4 leaves a workspace a share of 1 (db/shares.py): while one of its
    transactions is open, its next one waits, and another workspace's goes through."""
    database = await connect_database(database_url, min_size=1, max_size=4)
    try:
        assert database.shares.share == 1
        holding, release = asyncio.Event(), asyncio.Event()
        order: list[str] = []

        async def transaction(ws: Workspace, name: str, hold: bool = False) -> None:
            async with database.workspace(ws.id) as conn:
                await conn.fetchval("SELECT 1")
                order.append(name)
                if hold:
                    holding.set()
                    await release.wait()

        first = asyncio.create_task(transaction(workspace, "first", hold=True))
        await asyncio.wait_for(holding.wait(), 5.0)
        second = asyncio.create_task(transaction(workspace, "second"))
        await asyncio.wait_for(transaction(other_workspace, "other"), 5.0)
        assert order == ["first", "other"]  # the second waits for its workspace's turn
        assert not second.done()
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second), 5.0)
        assert order == ["first", "other", "second"]
        assert database.shares.gates() == 0  # nothing is kept for idle workspaces
    finally:
        await database.close()
