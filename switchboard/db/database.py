"""Connections to Postgres: the owner runs migrations; everything else runs as `switchboard_app`,
a role that owns nothing and cannot bypass row-level security, inside transactions that first
set `app.workspace_id`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeAlias, cast
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from switchboard.db.commits import commit_starting
from switchboard.db.migrate import apply_migrations
from switchboard.db.scoped import scoped_transaction
from switchboard.db.shares import WorkspaceShares, share_of

log = logging.getLogger(__name__)

APP_ROLE = "switchboard_app"


class PooledConnection(asyncpg.Connection):
    """A pooled connection that is reset only if it took session state.

    asyncpg resets every connection handed back to the pool with a query (unlock advisory
    locks, close cursors, unlisten, reset settings): a round trip per request, about a tenth
    of a small request's cost. Nothing here leaves session state but the outbox relay (its
    advisory lock and LISTEN), which takes its connection from `Database.session()`;
    everything else sets `app.workspace_id` for its transaction only, and the pool rolls back
    an unfinished transaction either way."""

    __slots__ = ("_holds_session_state",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._holds_session_state = False

    def keep_session_state(self) -> None:
        """Marks this connection for the full reset when it goes back to the pool."""
        self._holds_session_state = True

    def get_reset_query(self) -> str:
        if not self._holds_session_state:
            return ""
        self._holds_session_state = False
        query: str = super().get_reset_query()
        return query


# What a query function receives: a plain connection or one lent by the pool.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"


# The name of the application role's password in `gateway_secrets`.
APP_PASSWORD_SECRET = "app_role_password"  # noqa: S105 (a row name, not a password)


def app_role_url(owner_url: str, password: str) -> str:
    """The owner's URL with the application role and `password` in place of the owner's."""
    parts = urlsplit(owner_url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{APP_ROLE}:{quote(password, safe='')}@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def check_app_role_password(password: str) -> None:
    """Refuses a given password we could not hash the way Postgres would: SCRAM normalises
    non-ASCII passwords (SASLprep), and a short one would be the weakest link."""
    if not (password.isascii() and password.isprintable()) or len(password) < 16:
        raise ValueError(
            "SWITCHBOARD_APP_ROLE_PASSWORD must be at least 16 printable ASCII characters"
        )


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = 4096) -> str:
    """What Postgres stores for a SCRAM-SHA-256 password (RFC 5802, RFC 7677). Sending this
    instead of the password keeps the password out of the server's statement log."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


@dataclass(frozen=True)
class PreparedDatabase:
    """What every replica needs from the owner before it connects as the application role."""

    stream_token_secret: bytes = field(repr=False)
    app_url: str = field(repr=False)  # carries the application role's password


async def prepare_database(
    owner_url: str, app_role_password: str | None = None
) -> PreparedDatabase:
    """Migrates the schema, settles the application role's password, and returns it with the
    stream-token signing secret (both made by whichever replica starts first).

    The password is `app_role_password` when given; otherwise the random one kept in this
    database's `gateway_secrets`, made on first use. Every replica therefore uses the same one,
    whatever host name or credentials its owner URL has.
    """
    if app_role_password is not None:
        check_app_role_password(app_role_password)
    conn = await asyncpg.connect(owner_url)
    try:
        await apply_migrations(conn)
        password = await _settle_app_password(conn, owner_url, app_role_password)
        await conn.execute(
            "INSERT INTO gateway_secrets (name, value) VALUES ('stream_tokens', $1) "
            "ON CONFLICT (name) DO NOTHING",
            secrets.token_bytes(32),
        )
        secret = await conn.fetchval(
            "SELECT value FROM gateway_secrets WHERE name = 'stream_tokens'"
        )
        return PreparedDatabase(bytes(secret), app_role_url(owner_url, password))
    finally:
        await conn.close()


async def stored_app_role_url(owner_url: str) -> str:
    """The application role's URL, with the password `prepare_database` stored (for tools and
    tests that act as the application without preparing the database again)."""
    conn = await asyncpg.connect(owner_url)
    try:
        stored = await _stored_password(conn)
    finally:
        await conn.close()
    if stored is None:
        raise RuntimeError("the database is not prepared yet: run prepare_database first")
    return app_role_url(owner_url, stored)


async def _stored_password(conn: asyncpg.Connection) -> str | None:
    value = await conn.fetchval(
        "SELECT value FROM gateway_secrets WHERE name = $1", APP_PASSWORD_SECRET
    )
    return None if value is None else bytes(value).decode()


async def _settle_app_password(conn: asyncpg.Connection, owner_url: str, given: str | None) -> str:
    if given is not None:
        # Kept too, so a replica started without the setting follows instead of overwriting.
        await conn.execute(
            "INSERT INTO gateway_secrets (name, value) VALUES ($1, $2) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            APP_PASSWORD_SECRET,
            given.encode(),
        )
        password = given
    else:
        stored = await _stored_password(conn)
        if stored is None:
            candidate = await _sibling_password(conn, owner_url) or secrets.token_urlsafe(32)
            await conn.execute(
                "INSERT INTO gateway_secrets (name, value) VALUES ($1, $2) "
                "ON CONFLICT (name) DO NOTHING",
                APP_PASSWORD_SECRET,
                candidate.encode(),
            )
            stored = await _stored_password(conn)  # another replica may have won the race
            assert stored is not None
        password = stored
    if not await _authenticates(owner_url, password):
        # A hash, not the password: ALTER ROLE takes no parameters, and statement logs keep
        # what they are sent. The verifier is base64 and digits only, so it needs no quoting.
        verifier = scram_verifier(password)
        await conn.execute(f"ALTER ROLE {APP_ROLE} LOGIN PASSWORD '{verifier}'")
        log.info("set the password of the %s role", APP_ROLE)
    return password


async def _authenticates(owner_url: str, password: str) -> bool:
    try:
        probe = await asyncpg.connect(app_role_url(owner_url, password))
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError):
        return False
    await probe.close()
    return True


async def _sibling_password(conn: asyncpg.Connection, owner_url: str) -> str | None:
    """The application role's password kept by another Switchboard database on this server.

    Roles belong to the whole server, `gateway_secrets` to one database: a second Switchboard
    database on the same server (tests, staging beside production) must adopt the password the
    role already has, or it would lock the first one's replicas out. Only a password that still
    logs in is adopted.
    """
    names = await conn.fetch(
        "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
        "AND datname <> current_database() AND has_database_privilege(datname, 'CONNECT') "
        "ORDER BY oid DESC"
    )
    for row in names:
        try:
            other = await asyncpg.connect(owner_url, database=row["datname"])
        except (asyncpg.PostgresError, OSError):
            continue  # not ours to read
        try:
            if await other.fetchval("SELECT to_regclass('gateway_secrets') IS NULL"):
                continue
            value = await other.fetchval(
                "SELECT value FROM gateway_secrets WHERE name = $1", APP_PASSWORD_SECRET
            )
        except asyncpg.PostgresError:
            continue
        finally:
            await other.close()
        if value is not None and await _authenticates(owner_url, bytes(value).decode()):
            log.info("adopted the %s password of database %s", APP_ROLE, row["datname"])
            return bytes(value).decode()
    return None


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
        # No workspace holds the whole pool: two connections stay for the others (shares.py).
        self.shares = WorkspaceShares(share_of(pool.get_max_size()))

    @asynccontextmanager
    async def workspace(self, workspace_id: str) -> AsyncIterator[Connection]:
        """A transaction in which row-level security shows only `workspace_id`'s rows, on a
        connection taken within the workspace's share of the pool."""
        async with (
            self.shares.turn(workspace_id),
            self.pool.acquire() as conn,
            scoped_transaction(conn, workspace_id),
        ):
            yield conn
            # Reached only when the body did not raise: the transaction commits next, and from
            # here the request must not be answered with an error (db/commits.py).
            commit_starting()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[Connection]:
        """A connection that may take session state (advisory locks, LISTEN): the pool resets
        it fully when it is handed back, however the body ends."""
        async with self.pool.acquire() as conn:
            cast(PooledConnection, conn).keep_session_state()  # the pool's proxy forwards it
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

    async def call_statuses(self, workspace_id: str, call_ids: Collection[str]) -> dict[str, str]:
        """The statuses of those of `call_ids` that exist in this workspace."""
        async with self.workspace(workspace_id) as conn:
            rows = await conn.fetch(
                "SELECT id, status FROM calls WHERE id = ANY($1::text[])", list(call_ids)
            )
        return {str(r["id"]): str(r["status"]) for r in rows}

    async def existing_conversations(
        self, workspace_id: str, conversation_ids: Collection[str]
    ) -> dict[str, bool]:
        """Those of `conversation_ids` that exist in this workspace, each mapped to True."""
        async with self.workspace(workspace_id) as conn:
            rows = await conn.fetch(
                "SELECT id FROM conversations WHERE id = ANY($1::text[])", list(conversation_ids)
            )
        return {str(r["id"]): True for r in rows}

    async def ping(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def close(self) -> None:
        await self.pool.close()


async def connect_database(
    owner_url: str,
    *,
    max_size: int,
    app_role_password: str | None = None,
    min_size: int = 2,
) -> Database:
    prepared = await prepare_database(owner_url, app_role_password)
    pool = await asyncpg.create_pool(
        prepared.app_url,
        min_size=min_size,
        max_size=max_size,
        server_settings={"application_name": "switchboard"},
        connection_class=PooledConnection,
        **_pool_options(),
    )
    return Database(pool, prepared.stream_token_secret)


def _pool_options() -> dict[str, Any]:
    # Idle connections are recycled so a Postgres failover does not leave dead ones in the pool.
    return {"max_inactive_connection_lifetime": 300.0}
