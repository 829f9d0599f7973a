"""Creating workspaces and keys: shared by the REST API, the admin CLI and first-start bootstrap.
Runs as the application role inside a workspace-scoped transaction, so RLS checks it too."""

from __future__ import annotations

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
