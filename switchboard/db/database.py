"""Connections to Postgres: the owner runs migrations; everything else runs as `switchboard_app`,
a role that owns nothing and cannot bypass row-level security, inside transactions that first
set `app.workspace_id`."""

from __future__ import annotations

import hashlib
import hmac
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


async def prepare_database(owner_url: str) -> None:
    """Migrates the schema and sets the application role's password (idempotent)."""
    conn = await asyncpg.connect(owner_url)
    try:
        await apply_migrations(conn)
        # Not a parameter: ALTER ROLE takes no bind parameters; the value is hex, so it is safe.
        password = app_role_password(owner_url)
        await conn.execute(f"ALTER ROLE {APP_ROLE} LOGIN PASSWORD '{password}'")
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

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

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

    async def ping(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def close(self) -> None:
        await self.pool.close()


async def connect_database(owner_url: str, *, min_size: int = 2, max_size: int = 20) -> Database:
    await prepare_database(owner_url)
    pool = await asyncpg.create_pool(
        app_role_url(owner_url),
        min_size=min_size,
        max_size=max_size,
        server_settings={"application_name": "switchboard"},
        **_pool_options(),
    )
    return Database(pool)


def _pool_options() -> dict[str, Any]:
    # Idle connections are recycled so a Postgres failover does not leave dead ones in the pool.
    return {"max_inactive_connection_lifetime": 300.0}
