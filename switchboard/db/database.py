"""Connections to Postgres: the owner runs migrations; everything else runs as `switchboard_app`,
a role that owns nothing and cannot bypass row-level security, inside transactions that first
set `app.workspace_id`."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from switchboard.db.migrate import apply_migrations

APP_ROLE = "switchboard_app"

# What a query function receives: a plain connection or one lent by the pool.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"


def app_role_password(owner_url: str) -> str:
    """The application role's password, derived from the owner's credentials: every replica given
    the same SWITCHBOARD_DATABASE_URL computes the same one, with no second secret to distribute."""
    parts = urlsplit(owner_url)
    material = f"{parts.username}:{parts.password}@{parts.hostname}:{parts.port}"
    return hmac.new(material.encode(), b"switchboard_app role v1", hashlib.sha256).hexdigest()


def app_role_url(owner_url: str) -> str:
    parts = urlsplit(owner_url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{APP_ROLE}:{quote(app_role_password(owner_url), safe='')}@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def prepare_database(owner_url: str) -> bytes:
    """Migrates the schema, sets the application role's password (idempotent), and returns the
    stream-token signing secret (made by whichever replica starts first)."""
    conn = await asyncpg.connect(owner_url)
    try:
        await apply_migrations(conn)
        # Not a parameter: ALTER ROLE takes no bind parameters; the value is hex, so it is safe.
        password = app_role_password(owner_url)
        await conn.execute(f"ALTER ROLE {APP_ROLE} LOGIN PASSWORD '{password}'")
        await conn.execute(
            "INSERT INTO gateway_secrets (name, value) VALUES ('stream_tokens', $1) "
            "ON CONFLICT (name) DO NOTHING",
            secrets.token_bytes(32),
        )
        secret = await conn.fetchval(
            "SELECT value FROM gateway_secrets WHERE name = 'stream_tokens'"
        )
        return bytes(secret)
    finally:
        await conn.close()


@dataclass(frozen=True)
class ApiKeyCandidate:
    key_id: str
    workspace_id: str
    mode: str
    secret_hash: bytes


class Database:
    """The application's handle on Postgres; every query goes through `workspace()`."""

    def __init__(self, pool: asyncpg.Pool, stream_token_secret: bytes) -> None:
        self.pool = pool
        self.stream_token_secret = stream_token_secret

    @asynccontextmanager
    async def workspace(self, workspace_id: str) -> AsyncIterator[Connection]:
        """A transaction in which row-level security shows only `workspace_id`'s rows."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT set_config('app.workspace_id', $1, true)", workspace_id)
            yield conn

    async def key_candidates(self, display_prefix: str) -> list[ApiKeyCandidate]:
        """Unrevoked keys whose secret starts with `display_prefix` (the one path around RLS)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT * FROM lookup_api_key($1)", display_prefix)
        return [
            ApiKeyCandidate(r["key_id"], r["workspace_id"], r["mode"], bytes(r["secret_hash"]))
            for r in rows
        ]

    async def key_active(self, workspace_id: str, key_id: str) -> bool:
        async with self.workspace(workspace_id) as conn:
            return bool(
                await conn.fetchval("SELECT revoked_at IS NULL FROM api_keys WHERE id = $1", key_id)
            )

    async def call_status(self, workspace_id: str, call_id: str) -> str | None:
        """The call's status, or None when it does not exist in this workspace."""
        async with self.workspace(workspace_id) as conn:
            status = await conn.fetchval("SELECT status FROM calls WHERE id = $1", call_id)
        return None if status is None else str(status)

    async def conversation_exists(self, workspace_id: str, conversation_id: str) -> bool:
        async with self.workspace(workspace_id) as conn:
            found = await conn.fetchval(
                "SELECT 1 FROM conversations WHERE id = $1", conversation_id
            )
        return found is not None

    async def ping(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def close(self) -> None:
        await self.pool.close()


async def connect_database(owner_url: str, *, min_size: int = 2, max_size: int = 20) -> Database:
    secret = await prepare_database(owner_url)
    pool = await asyncpg.create_pool(
        app_role_url(owner_url),
        min_size=min_size,
        max_size=max_size,
        server_settings={"application_name": "switchboard"},
        **_pool_options(),
    )
    return Database(pool, secret)


def _pool_options() -> dict[str, Any]:
    # Idle connections are recycled so a Postgres failover does not leave dead ones in the pool.
    return {"max_inactive_connection_lifetime": 300.0}
