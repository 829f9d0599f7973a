"""`switchboard serve`: start (or find) Postgres and NATS, open the services, run the HTTP server,
and on Ctrl-C or SIGTERM stop everything it started, in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvicorn

from switchboard import __version__
from switchboard.api.affinity import Handoffs
from switchboard.api.deps import Services
from switchboard.auth.authenticator import Authenticator
from switchboard.bus import connect_bus
from switchboard.bus.event_outbox import OutboxRelay
from switchboard.config import Settings
from switchboard.db import Database, connect_database
from switchboard.embedded import EmbeddedNats, EmbeddedPostgres
from switchboard.limits.shared import SharedLimits
from switchboard.live.hub import Hub
from switchboard.live.lag import LoopLag
from switchboard.live.metrics import Metrics
from switchboard.live.registry import StreamRegistry
from switchboard.workers import (
    API,
    ROLES,
    Supervisor,
    WorkerSpec,
    default_workers,
    open_socket,
    plan_processes,
    reserve_port,
    simulator_home,
)
from switchboard.workspaces import WorkspaceSummary, create_workspace, owned_workspaces

log = logging.getLogger(__name__)

ADMIN_CONNECTIONS = 40  # the supervisor's, admin commands', a spare

RUN_FILE = "run.json"

# An admin command line from its arguments (`keys create`), as the banner shows it to be pasted.
AdminCommand = Callable[[str], str]


def default_admin(arguments: str) -> str:
    return f"switchboard {arguments}"


@dataclass
class Backends:
    """Where Postgres and NATS are, and the embedded servers this process must stop."""

    database_url: str
    nats_url: str
    owned: list[EmbeddedPostgres | EmbeddedNats] = field(default_factory=list)
    run_file: Path | None = None

    @property
    def embedded(self) -> bool:
        return bool(self.owned)

    def stop(self) -> None:
        for server in reversed(self.owned):
            server.stop()
        if self.run_file is not None:
            self.run_file.unlink(missing_ok=True)


def start_backends(settings: Settings, processes: int = 1) -> Backends:
    """Starts an embedded Postgres and/or NATS for whichever URL is not configured, with room
    for `processes` processes' connection pools. Must run on the main thread (see
    `embedded`)."""
    backends = Backends(settings.database_url or "", settings.nats_url or "")
    if settings.database_url and settings.nats_url:
        return backends
    from switchboard.embedded import private_directory

    # 0700: it holds the servers' credentials, and nothing above it is ours to open up.
    data_dir = private_directory(settings.data_dir.resolve())
    try:
        if not settings.database_url:
            postgres = EmbeddedPostgres(
                data_dir / "postgres",
                max_connections=max(
                    200, settings.database_pool_size * processes + ADMIN_CONNECTIONS
                ),
            )
            backends.owned.append(postgres)
            backends.database_url = postgres.start()
        if not settings.nats_url:
            nats_server = EmbeddedNats(data_dir / "nats")
            backends.owned.append(nats_server)
            backends.nats_url = nats_server.start()
    except BaseException:
        backends.stop()
        raise
    backends.run_file = data_dir / RUN_FILE
    write_run_file(backends.run_file, backends)
    return backends


def write_run_file(path: Path, backends: Backends) -> None:
    """Lets admin commands reach the embedded servers of a running `serve` (0600: it holds
    their credentials, like the rest of the data dir)."""
    body = {
        "pid": os.getpid(),
        "database_url": backends.database_url,
        "nats_url": backends.nats_url,
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(orjson.dumps(body))


def read_run_file(data_dir: Path) -> dict[str, Any] | None:
    """The running `serve`'s backends in this data dir, or None when none is running."""
    import psutil

    path = data_dir.resolve() / RUN_FILE
    try:
        body: dict[str, Any] = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return body if psutil.pid_exists(int(body.get("pid", -1))) else None


async def open_services(settings: Settings, database_url: str, nats_url: str) -> Services:
    database = await connect_database(
        database_url,
        app_role_password=settings.app_role_password,
        max_size=settings.database_pool_size,
    )
    try:
        bus = await connect_bus(
            nats_url,
            history_seconds=settings.history_hours * 3600,
            replicas=settings.stream_replicas,
        )
    except BaseException:
        await database.close()
        raise
    authenticator = Authenticator(database, cache_ttl=settings.key_cache_ttl)
    metrics = Metrics()
    registry = StreamRegistry(metrics, settings.heartbeat_interval)
    authenticator.on_forget(registry.end_for_key)

    async def forget(key_id: str) -> None:
        authenticator.forget_key(key_id)

    await bus.on_key_revoked(forget)
    lag = LoopLag()
    lag.start()
    hub = Hub(bus.client, metrics, lag)
    bus.reconnect_listeners.append(hub.catch_up)
    limits = SharedLimits(
        bus,
        rate_per_minute=settings.workspace_rate_per_minute,
        max_streams=settings.workspace_max_streams,
        burst_seconds=settings.workspace_burst_seconds,
    )
    await limits.start()
    services = Services(settings, database, bus, authenticator, metrics, hub, registry, limits)
    # Stopped last of the stoppers (after the drain has ended this process's streams).
    services.stoppers.append(limits.stop)

    async def stop_sampling() -> None:
        lag.stop()

    services.stoppers.append(stop_sampling)
    services.background.append(asyncio.create_task(registry.run_ticker()))
    # Every process that serves the API relays its outbox: the REST writes' events reach the
    # bus only through a relay (one is active per database; the others stand by).
    relay = OutboxRelay(database, bus, metrics)
    await relay.start()
    services.stoppers.append(relay.stop)
    return services


async def close_services(services: Services) -> None:
    for stop in reversed(services.stoppers):
        with contextlib.suppress(Exception):
            await stop()
    for task in services.background:
        task.cancel()
    with contextlib.suppress(Exception):
        await services.bus.close()
    await services.database.close()


async def bootstrap_workspace(database_url: str, database: Database) -> str | None:
    """On the first start of an embedded install, creates a workspace and returns its key."""
    import asyncpg

    owner = await asyncpg.connect(database_url)
    try:
        if await owner.fetchval("SELECT count(*) FROM workspaces"):
            return None
    finally:
        await owner.close()
    async with database.pool.acquire() as conn, conn.transaction():
        _workspace_id, api_key = await create_workspace(conn, "Default workspace")
    return api_key


def draining(services: Services) -> Callable[[], Awaitable[None]]:
    async def drain() -> None:
        settings = services.settings
        await services.registry.drain(settings.drain_seconds, settings.shutdown_grace)

    return drain


async def first_workspace(database_url: str) -> str | None:
    """The workspace `serve --demo` simulates in: the first one made (the bootstrap's)."""
    import asyncpg

    owner = await asyncpg.connect(database_url)
    try:
        found = await owner.fetchval("SELECT id FROM workspaces ORDER BY seq LIMIT 1")
    finally:
        await owner.close()
    return None if found is None else str(found)


class PortUnavailable(Exception):
    """`serve` cannot listen where it was asked to; the message says what to do instead."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port). `serve` takes it before it starts or creates
    anything, so a port that is taken costs nothing, least of all the one-time API key of a
    first start. It listens at once, which holds the port against every other process (a bound
    socket that does not listen yet can share it with another SO_REUSEADDR socket); a client
    that connects while the rest starts waits in the backlog."""
    try:
        sock = open_socket(host, port, reuse_port=False, listen=True)
    except OSError as failure:
        raise PortUnavailable(port_unavailable_message(host, port, failure)) from None
    sock.set_inheritable(True)
    return sock


def port_unavailable_message(host: str, port: int, failure: OSError) -> str:
    import errno

    from switchboard.embedded import port_holder

    why = {
        errno.EADDRINUSE: f"another process is listening on it{port_holder(port)}",
        errno.EACCES: "this user may not listen on it",
        errno.EADDRNOTAVAIL: f"{host} is not an address of this machine",
    }.get(failure.errno or 0, failure.strerror or str(failure))
    return (
        f"cannot listen on {host}:{port}: {why}. Nothing was started or created. Choose "
        f"another port: --port 0 picks a free one (or name one, e.g. --port {port % 65535 + 1})."
    )


class GatewayServer(uvicorn.Server):
    """uvicorn's server, but it leaves signals to us: on SIGINT or SIGTERM it shuts down
    gracefully and returns, instead of re-raising the signal afterwards (which would kill the
    process before it stops the embedded Postgres and NATS)."""

    def __init__(
        self,
        config: uvicorn.Config,
        drain: Callable[[], Awaitable[None]] | None = None,
        handoffs: Handoffs | None = None,
    ) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()
        self.drain = drain
        self.handoffs = handoffs
        self._adopting: set[asyncio.Task[None]] = set()

    def adopt(self, sock: socket.socket, head: bytes) -> None:
        """Serves a connection another worker passed here with the bytes it had read
        (api/affinity.py), as if this server had accepted it."""
        from switchboard.api.http_protocol import GatewayHttpProtocol

        config = self.config

        def protocol() -> asyncio.Protocol:
            made = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )
            assert isinstance(made, GatewayHttpProtocol)
            made.adopted = head  # parsed first, before anything read from the socket
            return made

        async def take() -> None:
            try:
                await asyncio.get_running_loop().connect_accepted_socket(protocol, sock)
            except OSError:
                sock.close()  # the client left meanwhile

        task = asyncio.get_running_loop().create_task(take())
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Take no more connections passed from other workers: they serve those themselves.
        if self.handoffs is not None:
            self.handoffs.close()
        # Stop accepting at once: the drain takes a while, and its clients reconnect elsewhere.
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        # Streams first get their terminal frame or close code (SPEC 6, drain), spread over the
        # drain window, so that no client is cut without being told to reconnect and they do not
        # all come back at once; then uvicorn closes what is left. The drain must come first:
        # uvicorn's own shutdown closes every WebSocket with 1012 at once. Its graceful timeout
        # starts after the drain, so a stop takes at most the window plus twice the grace.
        if self.drain is not None:
            drain = asyncio.ensure_future(self.drain())
            while not drain.done():
                await asyncio.wait([drain], timeout=0.1)
                if self.force_exit:  # a second Ctrl-C: the streams still open end at once
                    drain.cancel()
            try:
                await drain
            except asyncio.CancelledError:
                pass
            except Exception:  # uvicorn must still close what is left
                log.exception("the drain of the open streams failed")
        await super().shutdown(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.listening.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # an embedded server in a test thread: its owner stops it
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def uvicorn_config(
    app: Any, settings: Settings, handoffs: Handoffs | None = None
) -> uvicorn.Config:
    from switchboard.api.http_protocol import GatewayHttpProtocol, GatewayWebSocketProtocol

    return uvicorn.Config(
        app,
        # uvicorn's httptools and websockets-sansio protocols, with the head limit (431) and
        # the error envelope on the answers they give themselves (api/http_protocol.py).
        http=type(
            "ConfiguredHttpProtocol",
            (GatewayHttpProtocol,),
            {
                "max_head_bytes": settings.max_header_bytes,
                "early_refusal": getattr(app, "early_refusal", None),
                "handoffs": handoffs,
            },
        ),
        ws=GatewayWebSocketProtocol,
        loop="none",
        lifespan="off",
        access_log=False,
        log_config=None,
        server_header=False,
        # No X-Forwarded-For rewriting: nothing here uses the client's address, and the
        # middleware would sit in every stream's call chain for its whole life.
        proxy_headers=False,
        timeout_graceful_shutdown=int(max(1, settings.shutdown_grace)),
        timeout_keep_alive=30,
        # uvicorn pings every heartbeat and closes (1011) a peer that does not pong in time.
        ws_ping_interval=settings.heartbeat_interval,
        ws_ping_timeout=settings.heartbeat_interval,
        ws_max_size=16 * 1024,  # commands are tiny; a bigger message is closed with 1009
        # permessage-deflate would compress every frame once per client (a third of the CPU at
        # 5,000 sockets) and keep a zlib context per connection; envelopes are small anyway.
        ws_per_message_deflate=False,
    )


def banner(
    url: str,
    api_key: str | None,
    backends: Backends | None = None,
    workspaces: Sequence[WorkspaceSummary] = (),
    admin: AdminCommand = default_admin,
) -> str:
    """What `serve` prints once it listens. Secrets appear only when they exist nowhere else:
    the new API key, once. The NATS token stays in its 0600 file, named here, so the banner can
    be pasted or logged. On a later start, where the key is no longer known, it names the
    workspace and a command (`admin` is how this process was invoked) that makes a new key."""
    from switchboard.embedded import without_credentials

    key_line = (
        f"  API key:    {api_key}\n              (shown once: it is stored only as a hash)\n"
        if api_key
        else _later_start_lines(workspaces, admin)
    )
    nats_line = ""
    if backends is not None:
        embedded = [server for server in backends.owned if isinstance(server, EmbeddedNats)]
        if embedded:
            nats_line = (
                f"  NATS:       {embedded[0].public_url}  (for producers; the same at every "
                f"start)\n              token in {embedded[0].token_path}\n"
            )
        else:
            public = ",".join(without_credentials(u.strip()) for u in backends.nats_url.split(","))
            nats_line = f"  NATS:       {public}\n"
    example = api_key or "<key>"
    return (
        f"\nSwitchboard {__version__} is ready\n"
        f"  URL:        {url}\n"
        f"  Dashboard:  {url}/\n"
        f"  API docs:   {url}/docs  (OpenAPI at {url}/openapi.json)\n"
        f"{nats_line}"
        f"{key_line}"
        f'  Try:        curl -H "Authorization: Bearer {example}" {url}/v1/workspace\n'
    )


def _later_start_lines(workspaces: Sequence[WorkspaceSummary], admin: AdminCommand) -> str:
    indent = "\n              "
    if not workspaces:
        make = admin('workspace create "My workspace"')
        return f"  API key:    no workspace yet; make one:{indent}{make}\n"
    first = workspaces[0]
    if len(workspaces) == 1:
        where = f"  Workspace:  {first.id} ({first.name})\n"
        command = admin("keys create")
    else:
        where = (
            f"  Workspaces: {first.id} ({first.name}) and {len(workspaces) - 1} more"
            f"{indent}(all of them: {admin('workspace list')})\n"
        )
        command = admin(f"keys create --workspace {first.id}")
    return f"{where}  API key:    shown at the first start only; a new one:{indent}{command}\n"


@dataclass(frozen=True)
class FirstStart:
    """What the banner reports about the store: a new key (first start only), the workspaces
    (later starts), and the workspace `--demo` simulates in."""

    api_key: str | None
    workspaces: list[WorkspaceSummary]
    demo_workspace: str | None


async def prepare_store(settings: Settings, backends: Backends, demo: bool) -> FirstStart:
    """Before any worker starts: migrates the database (once, not once per worker) and, on the
    first start of an embedded install, creates the workspace and its key."""
    database = await connect_database(
        backends.database_url,
        app_role_password=settings.app_role_password,
        min_size=1,
        max_size=2,
    )
    try:
        api_key = (
            await bootstrap_workspace(backends.database_url, database)
            if backends.embedded
            else None
        )
    finally:
        await database.close()
    workspaces = [] if api_key else await owned_workspaces(backends.database_url)
    demo_workspace = await first_workspace(backends.database_url) if demo else None
    return FirstStart(api_key, workspaces, demo_workspace)


class _StopRequested(Exception):
    """SIGINT or SIGTERM reached the supervisor: stop every process, then return normally."""


def _stop_requested(signum: int, frame: Any) -> None:
    raise _StopRequested


def serve(
    settings: Settings,
    *,
    demo: bool = False,
    admin: AdminCommand = default_admin,
    workers: int | None = None,
    roles: Sequence[str] = ROLES,
    announce: Callable[[str], None] = print,
) -> None:
    """Runs `workers` gateway processes (default: one per core) and a process for the durable
    consumers, or only the `roles` asked for (see `switchboard.workers`). `admin`: how to invoke
    this command again, for the banner's `keys create` line."""
    plans = plan_processes(workers or default_workers(), roles)
    serves_api = any(API in plan.roles for plan in plans)
    # SIGTERM and Ctrl-C unwind to the `finally` blocks below, which stop the processes (each
    # drains its streams), then the embedded servers, whatever had been started by then.
    signal.signal(signal.SIGTERM, _stop_requested)
    signal.signal(signal.SIGINT, _stop_requested)
    # The port first: when it is taken, nothing is started or created (PortUnavailable).
    sock = bind_socket(settings.host, settings.port) if serves_api else None
    supervisor: Supervisor | None = None
    gateways = [plan for plan in plans if API in plan.roles]
    # Where the gateways pass each other stream connections (api/affinity.py): a directory only
    # this user may enter, removed when the serve stops.
    handoffs = (
        tempfile.TemporaryDirectory(prefix="switchboard-")
        if len(gateways) > 1 and settings.stream_affinity
        else None
    )
    try:
        backends = start_backends(settings, len(plans))
        try:
            first = run(prepare_store(settings, backends, demo))
            if sock is not None:
                sock = reserve_port(sock)
                host, port = sock.getsockname()[:2]
            else:
                host, port = settings.host, 0
            home = simulator_home(plans)
            serve_id = secrets.token_hex(8)
            specs = [
                WorkerSpec(
                    plan,
                    settings,
                    backends.database_url,
                    backends.nats_url,
                    host,
                    port,
                    first.demo_workspace if plan is home else None,
                    serve_id=serve_id,
                    processes=len(plans),
                    gateway_index=gateways.index(plan) if plan in gateways else 0,
                    gateways=len(gateways),
                    handoff_dir=handoffs.name if handoffs is not None else "",
                )
                for plan in plans
            ]
            # A stop waits for every process's drain and grace, then kills what is left.
            stop_timeout = settings.drain_seconds + 2 * settings.shutdown_grace + 10
            supervisor = Supervisor(specs, stop_timeout)
            supervisor.start()
            if serves_api:
                url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
                announce(banner(url, first.api_key, backends, first.workspaces, admin))
            else:
                running = ", ".join(sorted({r for p in plans for r in p.roles}))
                announce(f"\nSwitchboard {__version__} is running: {running} (no HTTP port)\n")
            sys.stdout.flush()
            supervisor.watch(lambda: False)
        except _StopRequested:
            pass
        finally:
            if supervisor is not None:
                # A second Ctrl-C while the processes drain kills them at once.
                signal.signal(signal.SIGINT, supervisor.force)
                signal.signal(signal.SIGTERM, supervisor.force)
                supervisor.stop()
            backends.stop()
            log.info("stopped")
    except _StopRequested:
        pass
    finally:
        if sock is not None:
            sock.close()
        if handoffs is not None:
            handoffs.cleanup()


def run(coroutine: Any) -> Any:
    """Runs a coroutine on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)
