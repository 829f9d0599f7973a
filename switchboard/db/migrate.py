"""Plain-SQL migrations, applied in order at start, each once, safe to run from many replicas."""

from __future__ import annotations

import logging
from importlib import resources

import asyncpg

log = logging.getLogger(__name__)

# Any constant will do; it only has to be the same for every replica.
MIGRATION_LOCK_KEY = 0x5357_4244  # "SWBD"


def migration_files() -> list[tuple[str, str]]:
    """(version, sql) pairs in the order they must run; the version is the file's stem."""
    folder = resources.files("switchboard.db") / "migrations"
    files = sorted(
        (entry.name, entry.read_text()) for entry in folder.iterdir() if entry.name.endswith(".sql")
    )
    return [(name.removesuffix(".sql"), sql) for name, sql in files]


async def apply_migrations(conn: asyncpg.Connection) -> list[str]:
    """Applies the pending migrations as the connection's (owning) role; returns their versions."""
    applied: list[str] = []
    # A session lock, so two replicas starting at once take turns instead of racing.
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version text PRIMARY KEY,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            log.info("applied migration %s", version)
            applied.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied
