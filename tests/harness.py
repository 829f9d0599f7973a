"""Test harness: real Postgres and NATS (embedded from the wheels, or the URLs in
SWITCHBOARD_TEST_DATABASE_URL / SWITCHBOARD_TEST_NATS_URL), and a real Switchboard server on
127.0.0.1 running in a thread with its own event loop."""

from __future__ import annotations

import asyncio
import inspect
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from switchboard.api.app import create_app
from switchboard.api.deps import Services
from switchboard.config import Settings
from switchboard.db.database import stored_app_role_url
from switchboard.server import (
    GatewayServer,
    bind_socket,
    close_services,
    draining,
    open_services,
    run,
)
from switchboard.server import uvicorn_config as make_uvicorn_config
from switchboard.workspaces import create_workspace


async def eventually(check: Callable[[], Any], within: float = 10.0) -> Any:
    """Waits for a condition that can only be observed by asking (state in another thread, a
    process or the database): polls `check` (sync or async) until it is truthy, or fails."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


async def create_test_database(owner_url: str) -> str:
    """A fresh database on the given server, so runs never see each other's rows."""
    name = "sbtest_" + secrets.token_hex(6)
    conn = await asyncpg.connect(owner_url)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return with_database(owner_url, name)


@dataclass
class Workspace:
    id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


async def new_workspace(database_url: str, name: str = "test") -> Workspace:
    conn = await asyncpg.connect(await stored_app_role_url(database_url))
    try:
        async with conn.transaction():
            workspace_id, key = await create_workspace(conn, name)
    finally:
        await conn.close()
    return Workspace(workspace_id, key)


async def insert_turn(
    database_url: str, workspace_id: str, call_id: str, role: str, text: str
) -> str:
    """Writes a final turn as the recorder will (the recorder is a later issue's work)."""
    from switchboard.ids import new_id

    turn_id = new_id("trn")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO turns (id, workspace_id, call_id, role, text) VALUES ($1, $2, $3, $4, $5)",
            turn_id,
            workspace_id,
            call_id,
            role,
            text,
        )
    finally:
        await conn.close()
    return turn_id


@dataclass
class ServerThread:
    """A Switchboard server on 127.0.0.1:<free port>, in a thread, started and stopped by tests."""

    settings: Settings
    database_url: str
    nats_url: str
    url: str = ""
    services: Services | None = None
    app: Any = None
    _server: GatewayServer | None = None
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None
    loop: asyncio.AbstractEventLoop | None = None

    def call(self, fn: Any) -> Any:
        """Runs `fn()` on the server's event loop and returns its result (for inspection)."""
        assert self.loop is not None

        async def run_it() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run_it(), self.loop).result(10)

    def task_count(self) -> int:
        return int(self.call(lambda: len(asyncio.all_tasks())))

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread = threading.Thread(target=self._run, name="switchboard-test", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the test server did not start")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        try:
            run(self._main())
        except BaseException as failure:
            self._error = failure
            self._ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.services = await open_services(self.settings, self.database_url, self.nats_url)
        try:
            sock = bind_socket("127.0.0.1", 0)
            self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            self.app = create_app(self.services)
            self._server = GatewayServer(
                make_uvicorn_config(self.app, self.settings), drain=draining(self.services)
            )
            serving = asyncio.create_task(self._server.serve(sockets=[sock]))
            listening = asyncio.create_task(self._server.listening.wait())
            await asyncio.wait([serving, listening], return_when=asyncio.FIRST_COMPLETED)
            listening.cancel()
            self._ready.set()
            await serving
        finally:
            await close_services(self.services)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
