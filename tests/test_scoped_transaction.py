"""A workspace's transaction in one round trip (switchboard/db/scoped.py), on the real Postgres:
the setting row-level security reads is there from the first query, whatever the id looks
like; the work commits or rolls back as a whole; a savepoint undoes only its own work; and an
id that could escape its literal never reaches SQL text."""

from __future__ import annotations

import asyncpg
import pytest

from switchboard.db import connect_database
from switchboard.db.scoped import begin_statement, savepoint, scoped_transaction
from switchboard.ids import new_id
from tests.harness import Workspace


def test_only_a_well_formed_workspace_id_is_written_into_sql_text() -> None:
    workspace_id = new_id("ws")
    assert begin_statement(workspace_id) == (
        f"BEGIN; SELECT set_config('app.workspace_id', '{workspace_id}', true)"
    )
    for unsafe in ("", "ws'; DROP TABLE calls; --", "ws\\x", "ws x", "ws;x", "w" * 65, "ws-é"):
        assert begin_statement(unsafe) is None, unsafe
        if unsafe:  # nor a well-formed id with anything after it
            assert begin_statement(workspace_id + unsafe) is None, unsafe


@pytest.mark.parametrize("workspace_id", [new_id("ws"), "ws'quoted; --"])
async def test_the_workspace_is_set_for_the_transaction_and_only_for_it(
    database_url: str, workspace_id: str
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        async with scoped_transaction(conn, workspace_id):
            assert await conn.fetchval("SELECT current_setting('app.workspace_id')") == (
                workspace_id
            )
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT current_setting('app.workspace_id', true)") in (
            None,
            "",
        )
    finally:
        await conn.close()


async def test_the_body_commits_or_rolls_back_as_a_whole_and_a_savepoint_alone(
    database_url: str,
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("CREATE TEMP TABLE scoped_probe (n int)")
        async with scoped_transaction(conn, "ws_a"):
            await conn.execute("INSERT INTO scoped_probe VALUES (1)")
            with pytest.raises(ValueError):
                async with savepoint(conn):
                    await conn.execute("INSERT INTO scoped_probe VALUES (2)")
                    raise ValueError("undo only this")
            # A failed statement inside a savepoint leaves the transaction usable.
            with pytest.raises(asyncpg.UndefinedTableError):
                async with savepoint(conn):
                    await conn.execute("INSERT INTO no_such_table VALUES (1)")
            async with savepoint(conn):
                await conn.execute("INSERT INTO scoped_probe VALUES (3)")
        with pytest.raises(RuntimeError):
            async with scoped_transaction(conn, "ws_a"):
                await conn.execute("INSERT INTO scoped_probe VALUES (4)")
                raise RuntimeError("undo all of it")
        assert not conn.is_in_transaction()
        rows = await conn.fetch("SELECT n FROM scoped_probe ORDER BY n")
        assert [r["n"] for r in rows] == [1, 3]
    finally:
        await conn.close()


async def test_a_pooled_workspace_transaction_sees_its_own_rows_only(
    database_url: str, workspace: Workspace, other_workspace: Workspace
) -> None:
    database = await connect_database(database_url, min_size=1, max_size=2)
    try:
        for tenant in (workspace, other_workspace):
            async with database.workspace(tenant.id) as conn:
                seen = await conn.fetch("SELECT id FROM workspaces")
            assert [r["id"] for r in seen] == [tenant.id]
    finally:
        await database.pool.close()
