"""Creating workspaces and keys: shared by the REST API, the admin CLI and first-start bootstrap.
Runs as the application role inside a workspace-scoped transaction, so RLS checks it too.
Listing every workspace is an operator's view across them, so it runs as the owner."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from switchboard.auth.keys import generate_key
from switchboard.db import Connection
from switchboard.ids import new_id


async def insert_key(conn: Connection, workspace_id: str, name: str, mode: str) -> tuple[Any, str]:
    """Stores a new key's hash and returns (row, secret); the secret exists only in the caller."""
    key = generate_key(mode)
    row = await conn.fetchrow(
        """INSERT INTO api_keys (id, workspace_id, name, mode, display_prefix, secret_hash)
           VALUES ($1, $2, $3, $4, $5, $6) RETURNING *""",
        new_id("key"),
        workspace_id,
        name,
        mode,
        key.display_prefix,
        key.secret_hash,
    )
    return row, key.secret


async def create_workspace(conn: Connection, name: str) -> tuple[str, str]:
    """Creates a workspace and its first live key in the caller's transaction; returns
    (workspace_id, api_key)."""
    workspace_id = new_id("ws")
    await conn.execute("SELECT set_config('app.workspace_id', $1, true)", workspace_id)
    await conn.execute("INSERT INTO workspaces (id, name) VALUES ($1, $2)", workspace_id, name)
    _row, secret = await insert_key(conn, workspace_id, "default", "live")
    return workspace_id, secret


@dataclass(frozen=True)
class WorkspaceSummary:
    id: str
    name: str
    created_at: datetime
    active_keys: int


async def list_workspaces(owner: Any) -> list[WorkspaceSummary]:
    """Every workspace, oldest first (the first is the one `serve` made at its first start).
    `owner` is a connection as the schema's owner: RLS would show the app role none of them."""
    rows = await owner.fetch(
        """SELECT w.id, w.name, w.created_at,
                  (SELECT count(*) FROM api_keys k
                    WHERE k.workspace_id = w.id AND k.revoked_at IS NULL) AS active_keys
             FROM workspaces w ORDER BY w.seq"""
    )
    return [WorkspaceSummary(r["id"], r["name"], r["created_at"], r["active_keys"]) for r in rows]


async def owned_workspaces(database_url: str) -> list[WorkspaceSummary]:
    """`list_workspaces` over a connection of its own to the owner's `database_url`."""
    import asyncpg

    owner = await asyncpg.connect(database_url)
    try:
        return await list_workspaces(owner)
    finally:
        await owner.close()


class NoSingleWorkspace(Exception):
    """A command that may leave out `--workspace` only when there is exactly one."""


def only_workspace(workspaces: Sequence[WorkspaceSummary]) -> str:
    """The id of the one workspace, or NoSingleWorkspace saying how to choose."""
    if len(workspaces) == 1:
        return workspaces[0].id
    if not workspaces:
        raise NoSingleWorkspace(
            "there is no workspace yet: `switchboard serve` makes one at its first start, "
            '`switchboard workspace create "Name"` makes another'
        )
    choices = "".join(f"\n  {w.id}  {w.name}" for w in workspaces)
    raise NoSingleWorkspace(
        f"there are {len(workspaces)} workspaces; choose one with --workspace:{choices}"
    )
