"""Shared fixtures: one real Postgres and one real NATS per test session, a fresh database,
a default server, and factories for workspaces and servers with other settings."""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import nats
import pytest
from nats.aio.client import Client

from switchboard.config import Settings
from switchboard.db.database import prepare_database
from switchboard.embedded import EmbeddedNats, EmbeddedPostgres
from switchboard.logs import configure_logging
from tests.browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS
from tests.harness import ServerThread, Workspace, create_test_database, new_workspace

if TYPE_CHECKING:
    from playwright.async_api import Browser


@pytest.fixture(scope="session")
def backing_servers() -> Iterator[tuple[str, str]]:
    """(owner database URL, NATS URL) of a real Postgres and NATS."""
    database_url = os.environ.get("SWITCHBOARD_TEST_DATABASE_URL")
    nats_url = os.environ.get("SWITCHBOARD_TEST_NATS_URL")
    started: list[EmbeddedPostgres | EmbeddedNats] = []
    with tempfile.TemporaryDirectory(prefix="switchboard-test-") as scratch:
        try:
            if not database_url:
                postgres = EmbeddedPostgres(Path(scratch) / "postgres", fsync=False)
                started.append(postgres)
                database_url = postgres.start()
            if not nats_url:
                nats_server = EmbeddedNats(Path(scratch) / "nats")
                started.append(nats_server)
                nats_url = nats_server.start()
            yield database_url, nats_url
        finally:
            for server in reversed(started):
                server.stop()


@pytest.fixture(scope="session")
async def database_url(backing_servers: tuple[str, str]) -> str:
    """A fresh, migrated database; its URL names the owner role."""
    url = await create_test_database(backing_servers[0])
    await prepare_database(url)
    return url


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A NATS of its own, for a test that stops it, or whose consumers read every subject."""
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def own_database(backing_servers: tuple[str, str]) -> str:
    """A fresh database of its own, for a server on a NATS of its own: every API process relays
    its database's outbox to *its* bus, and the session's servers must not relay this test's
    events, nor this server the session's (a deployment shares one bus; these tests do not)."""
    url = await create_test_database(backing_servers[0])
    await prepare_database(url)
    return url


@pytest.fixture(scope="session")
def nats_url(backing_servers: tuple[str, str]) -> str:
    return backing_servers[1]


@pytest.fixture(scope="session")
def make_server(database_url: str, nats_url: str) -> Iterator[Callable[..., ServerThread]]:
    """Starts extra servers (replicas) on the same Postgres and NATS, with setting overrides."""
    servers: list[ServerThread] = []

    def make(**overrides: Any) -> ServerThread:
        # Webhook receivers in tests live on 127.0.0.1, which production refuses.
        settings = Settings(
            database_url=database_url, nats_url=nats_url, webhook_allow_private=True
        ).with_overrides(**overrides)
        server = ServerThread(settings, database_url, nats_url).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(make_server: Callable[..., ServerThread]) -> ServerThread:
    return make_server()


@pytest.fixture
async def workspace(database_url: str) -> Workspace:
    return await new_workspace(database_url, "workspace A")


@pytest.fixture
async def other_workspace(database_url: str) -> Workspace:
    return await new_workspace(database_url, "workspace B")


@pytest.fixture
async def bus(nats_url: str, server: ServerThread) -> AsyncIterator[Client]:
    """A producer's own NATS connection; the server fixture has made the JetStream stream."""
    connection = await nats.connect(nats_url)
    yield connection
    await connection.close()


@pytest.fixture
async def client(server: ServerThread) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
        yield http


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One Chromium per module; each test makes a fresh context (its own sessionStorage)."""
    from playwright.async_api import async_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest.fixture
def console_log() -> Iterator[io.StringIO]:
    """The production console logging at INFO, written to a buffer, for one test."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    named = {n: logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "uvicorn.access")}
    saved_named = {
        n: (lg.handlers[:], lg.propagate, lg.disabled, lg.filters[:]) for n, lg in named.items()
    }
    buffer = io.StringIO()
    configure_logging("console", "info", stream=buffer)
    try:
        yield buffer
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        for name, (handlers, propagate, disabled, filters) in saved_named.items():
            logger = named[name]
            logger.handlers[:], logger.propagate, logger.disabled = handlers, propagate, disabled
            logger.filters[:] = filters
