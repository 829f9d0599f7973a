"""The embedded servers keep their data private and their ports stable, and the application
role's password is one random secret per server, whoever asks and by whatever host name.

Each test here runs its own Postgres or NATS (from the wheels) under a private temporary folder:
they change roles and server settings that the session's shared servers must not see."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import nats
import pytest

from switchboard.config import Settings
from switchboard.db.database import app_role_url, connect_database
from switchboard.embedded import (
    EmbeddedError,
    EmbeddedNats,
    EmbeddedPostgres,
    postgres_install,
    private_directory,
)
from tests.harness import create_test_database

pytestmark = pytest.mark.slow


def modes(paths: list[Path]) -> dict[Path, int]:
    return {path: stat.S_IMODE(path.lstat().st_mode) for path in paths}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def outside_paths(home: Path) -> list[Path]:
    """Everything a start could be tempted to open up: the folders above the data and the
    Postgres installation with the folders above it."""
    install = postgres_install()
    tree = [Path(top) / name for top, dirs, files in os.walk(install) for name in dirs + files]
    return [home, *home.parents, install, *install.parents, *tree]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 0700 folder standing for a home directory, with the data folder to be made inside."""
    folder = tmp_path_factory.mktemp("home")
    folder.chmod(0o700)
    return folder


@pytest.fixture(scope="module")
def cluster(home: Path) -> Iterator[EmbeddedPostgres]:
    data = private_directory(home / ".switchboard")
    postgres = EmbeddedPostgres(data / "postgres", fsync=False)
    postgres.start()
    yield postgres
    postgres.stop()


def test_postgres_keeps_its_data_private_and_touches_nothing_outside(home: Path) -> None:
    before = modes(outside_paths(home))
    data = private_directory(home / "private-start")
    postgres = EmbeddedPostgres(data / "postgres", fsync=False)
    try:
        postgres.start()  # as root (CI), Postgres runs as the `pgserver` user
        assert modes(outside_paths(home)) == before
        assert mode(home) == 0o700
        assert mode(data) == 0o700
        assert mode(postgres.root) == 0o700
        assert mode(postgres.pgdata) == 0o700
        assert mode(postgres.log_path) == 0o600
        assert mode(postgres.root / "superuser.password") == 0o600
        assert not list(postgres.root.glob(".initdb*")), "the initdb password file stayed"
    finally:
        postgres.stop()
    # A second start of the same data changes nothing either.
    again = EmbeddedPostgres(data / "postgres", fsync=False)
    try:
        again.start()
        assert modes(outside_paths(home)) == before
        assert mode(postgres.root) == 0o700 and mode(postgres.log_path) == 0o600
    finally:
        again.stop()


def test_postgres_comes_back_on_its_first_port_or_says_why_not(
    cluster: EmbeddedPostgres,
) -> None:
    port = cluster.port
    cluster.stop()
    try:
        again = EmbeddedPostgres(cluster.root, fsync=False)
        again.start()
        again.stop()
        assert again.port == port

        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
            with pytest.raises(EmbeddedError, match=rf"127\.0\.0\.1:{port}.*delete .*port"):
                EmbeddedPostgres(cluster.root, fsync=False).start()
    finally:
        cluster.start()


async def test_nats_comes_back_on_its_first_port_and_producers_reconnect(tmp_path: Path) -> None:
    root = private_directory(tmp_path / "data") / "nats"
    first = EmbeddedNats(root)
    first.start()
    port = first.port
    first.stop()

    # A new process (a new object) on the same data: the same port, the same token.
    second = EmbeddedNats(root)
    second.start()
    try:
        assert second.port == port
        assert second.public_url == f"nats://127.0.0.1:{port}"
        token = second.token_path.read_text().strip()
        assert token not in second.public_url
        assert mode(second.token_path) == 0o600 and mode(second.log_path) == 0o600
        assert mode(root) == 0o700
        # What a producer started separately does with the banner's URL and token file.
        producer = await nats.connect(second.public_url, token=token)
        await producer.close()
    finally:
        second.stop()

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(EmbeddedError, match=rf"127\.0\.0\.1:{port}") as refused:
            EmbeddedNats(root).start()
    assert token not in str(refused.value)


def with_host(url: str, host: str) -> str:
    return url.replace("@127.0.0.1:", f"@{host}:")


async def test_one_app_password_for_every_host_name_replica_and_database(
    cluster: EmbeddedPostgres,
) -> None:
    """Replicas that name the server differently (127.0.0.1, localhost) and a second Switchboard
    database on the same server all keep working after each other's start: the role's password
    is the one random secret the server already has, not something derived from a URL."""
    first = await create_test_database(cluster.url())
    second = await create_test_database(cluster.url())
    replicas = [
        await connect_database(first, min_size=1, max_size=1),
        await connect_database(with_host(first, "localhost"), min_size=1, max_size=1),
        await connect_database(second, min_size=1, max_size=1),
    ]
    try:
        for database in replicas:
            # New connections, made after every replica has started.
            await database.pool.expire_connections()
            await database.ping()
    finally:
        for database in replicas:
            await database.close()


async def test_a_given_app_password_is_used_and_never_sent_in_clear(
    cluster: EmbeddedPostgres,
) -> None:
    superuser = await asyncpg.connect(cluster.url())
    try:
        await superuser.execute("ALTER SYSTEM SET log_statement = 'ddl'")
        await superuser.execute("SELECT pg_reload_conf()")
    finally:
        await superuser.close()
    database_url = await create_test_database(cluster.url())
    given = "given-app-password-0123456789"
    explicit = await connect_database(database_url, app_role_password=given, min_size=1, max_size=1)
    # A replica started without the setting follows the database instead of overwriting it.
    follower = await connect_database(database_url, min_size=1, max_size=1)
    try:
        app = await asyncpg.connect(app_role_url(database_url, given))
        await app.close()
        for database in (explicit, follower):
            await database.pool.expire_connections()
            await database.ping()
    finally:
        await explicit.close()
        await follower.close()
    assert "ALTER ROLE" in cluster.log_path.read_text(), "statement logging is not on"
    assert given not in cluster.log_path.read_text()


async def test_postgres_has_room_for_the_pools_of_every_process(home: Path) -> None:
    from switchboard.server import start_backends

    # A serve of 12 processes, each pooling up to 30 connections, needs more than the default.
    settings = Settings(
        data_dir=home / "many-workers", nats_url="nats://127.0.0.1:1", database_pool_size=30
    )
    backends = start_backends(settings, processes=12)
    try:
        conn = await asyncpg.connect(backends.database_url)
        try:
            assert int(await conn.fetchval("SHOW max_connections")) >= 12 * 30
        finally:
            await conn.close()
    finally:
        backends.stop()
