"""The `switchboard` command: serve, and the admin commands for workspaces and keys."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import click
import orjson

from switchboard.client.environment import DEFAULT_URL, server_urls
from switchboard.config import Settings, SettingsError, load_settings
from switchboard.logs import configure_logging


def _settings(**overrides: Any) -> Settings:
    try:
        return load_settings().with_overrides(**overrides)
    except SettingsError as bad:
        raise click.UsageError(str(bad)) from None


def _print_json(value: Any) -> None:
    click.echo(orjson.dumps(value).decode())


@click.group()
@click.version_option(package_name="switchboard")
def main() -> None:
    """Switchboard: live streams of calls and conversations, over SSE, WebSocket and webhooks."""


@main.command()
@click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=None, help="Port (default 8080; 0 picks one)."
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the embedded Postgres and NATS keep their data (default ./.switchboard).",
)
@click.option("--log-format", type=click.Choice(["console", "json"]), default=None)
@click.option("--demo", is_flag=True, help="Also run a simulator: a steady trickle of live calls.")
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=None,
    help="Gateway processes sharing the port (default: one per core).",
)
@click.option(
    "--role",
    "roles",
    type=click.Choice(["api", "recorder", "webhooks"]),
    multiple=True,
    help="Run only this role (repeatable; default: all). api serves HTTP and the streams; "
    "recorder and webhooks are the durable consumers, in a process of their own.",
)
def serve(
    host: str | None,
    port: int | None,
    data_dir: Path | None,
    log_format: str | None,
    demo: bool,
    workers: int | None,
    roles: tuple[str, ...],
) -> None:
    """Start the gateway. Without SWITCHBOARD_DATABASE_URL / SWITCHBOARD_NATS_URL it starts an
    embedded Postgres and NATS under --data-dir, and stops them when it stops."""
    from switchboard.embedded import EmbeddedError
    from switchboard.server import PortUnavailable
    from switchboard.server import serve as run_serve
    from switchboard.workers import ROLES, WorkersFailed

    settings = _settings(host=host, port=port, data_dir=data_dir, log_format=log_format)
    configure_logging(settings.log_format, settings.log_level)
    admin = admin_command(sys.argv[0], sys.executable, Path.cwd(), settings)
    try:
        run_serve(settings, demo=demo, admin=admin, workers=workers, roles=roles or ROLES)
    except (EmbeddedError, PortUnavailable, WorkersFailed) as failure:
        raise click.ClickException(str(failure)) from None
    except OSError as failure:
        raise click.ClickException(f"could not start: {failure}") from None


def admin_command(
    argv0: str, executable: str, cwd: Path, settings: Settings
) -> Callable[[str], str]:
    """How to run an admin command the way this `serve` was run, for the banner: the same
    program (`.venv/bin/switchboard`, or `python -m switchboard`) and the same data dir, from
    the same folder when either is relative, so the line works pasted into another terminal."""
    import shlex

    module = Path(argv0).name == "__main__.py"
    program = [executable, "-m", "switchboard"] if module else [argv0]
    data_dir = settings.data_dir
    options = [] if data_dir == Settings().data_dir else ["--data-dir", str(data_dir)]
    relative = ("/" in argv0 and not Path(argv0).is_absolute()) or (
        settings.embedded_database and not data_dir.is_absolute()
    )
    prefix = f"cd {shlex.quote(str(cwd))} && " if relative else ""
    run = " ".join(shlex.quote(word) for word in program)
    tail = "".join(" " + shlex.quote(word) for word in options)
    return lambda arguments: f"{prefix}{run} {arguments}{tail}"


# --- admin commands ----------------------------------------------------------------------------


@contextlib.contextmanager
def _backends(settings: Settings) -> Iterator[tuple[str, str | None]]:
    """(database_url, nats_url or None): the configured servers, those of a running `serve` in
    --data-dir, or a Postgres started just for this command (no NATS: no replica to tell)."""
    from switchboard.embedded import EmbeddedPostgres, private_directory
    from switchboard.server import read_run_file

    if settings.database_url:
        yield settings.database_url, settings.nats_url
        return
    running = read_run_file(settings.data_dir)
    if running is not None:
        yield str(running["database_url"]), settings.nats_url or str(running["nats_url"])
        return
    postgres = EmbeddedPostgres(settings.data_dir.resolve() / "postgres")
    private_directory(settings.data_dir)  # as `serve` leaves it: 0700
    try:
        yield postgres.start(), settings.nats_url
    finally:
        postgres.stop()


@contextlib.asynccontextmanager
async def _database(database_url: str) -> AsyncIterator[Any]:
    from switchboard.db import connect_database

    database = await connect_database(database_url, min_size=1, max_size=2)
    try:
        yield database
    finally:
        await database.close()


def _run(coroutine: Any) -> Any:
    from switchboard.server import run

    return run(coroutine)


data_dir_option = click.option(
    "--data-dir", type=click.Path(path_type=Path), default=None, help="Embedded data dir."
)


async def _chosen_workspace(database_url: str, workspace_id: str | None) -> str:
    """`--workspace`, or when it is left out the only workspace there is."""
    from switchboard.workspaces import NoSingleWorkspace, only_workspace, owned_workspaces

    if workspace_id is not None:
        return workspace_id
    try:
        return only_workspace(await owned_workspaces(database_url))
    except NoSingleWorkspace as ambiguous:
        raise click.UsageError(str(ambiguous)) from None


workspace_option = click.option(
    "--workspace",
    "workspace_id",
    default=None,
    help="ws_... id (may be left out when there is only one workspace).",
)


@main.group()
def workspace() -> None:
    """Create and list workspaces."""


@workspace.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@data_dir_option
def workspace_list(as_json: bool, data_dir: Path | None) -> None:
    """List every workspace, oldest first, with its number of active keys."""
    from switchboard.ids import iso_ms
    from switchboard.workspaces import owned_workspaces

    with _backends(_settings(data_dir=data_dir)) as (database_url, _nats):
        workspaces = _run(owned_workspaces(database_url))
    if as_json:
        _print_json(
            [
                {
                    "id": w.id,
                    "name": w.name,
                    "created_at": iso_ms(w.created_at),
                    "active_keys": w.active_keys,
                }
                for w in workspaces
            ]
        )
        return
    rows = [("ID", "NAME", "CREATED", "ACTIVE KEYS")]
    rows += [(w.id, w.name, iso_ms(w.created_at), str(w.active_keys)) for w in workspaces]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join([*(row[i].ljust(widths[i]) for i in range(3)), row[3]]))


@workspace.command("create")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print {workspace_id, api_key} as JSON.")
@data_dir_option
def workspace_create(name: str, as_json: bool, data_dir: Path | None) -> None:
    """Create a workspace and its first API key (printed once)."""
    from switchboard.workspaces import create_workspace

    async def go(database_url: str) -> tuple[str, str]:
        async with (
            _database(database_url) as database,
            database.pool.acquire() as conn,
            conn.transaction(),
        ):
            result: tuple[str, str] = await create_workspace(conn, name)
            return result

    if not 1 <= len(name) <= 200:
        raise click.BadParameter("must be 1 to 200 characters", param_hint="NAME")
    with _backends(_settings(data_dir=data_dir)) as (database_url, _nats):
        workspace_id, api_key = _run(go(database_url))
    if as_json:
        _print_json({"workspace_id": workspace_id, "api_key": api_key})
    else:
        click.echo(f"workspace {workspace_id}\napi key   {api_key}  (shown once)")


@main.group()
def keys() -> None:
    """Create, list and revoke API keys."""


@keys.command("create")
@workspace_option
@click.option("--name", default="", help="A label for the key.")
@click.option("--mode", type=click.Choice(["live", "test"]), default="live")
@click.option("--json", "as_json", is_flag=True)
@data_dir_option
def keys_create(
    workspace_id: str | None, name: str, mode: str, as_json: bool, data_dir: Path | None
) -> None:
    """Create a key in a workspace; the secret is printed once."""
    from switchboard.render_cli import key_line
    from switchboard.workspaces import insert_key

    async def go(database_url: str) -> tuple[Any, str, str]:
        chosen = await _chosen_workspace(database_url, workspace_id)
        async with _database(database_url) as database, database.workspace(chosen) as conn:
            if not await conn.fetchval("SELECT 1 FROM workspaces"):
                raise click.ClickException(f"no workspace {chosen}")
            row, secret = await insert_key(conn, chosen, name, mode)
            return row, secret, chosen

    with _backends(_settings(data_dir=data_dir)) as (database_url, _nats):
        row, secret, chosen = _run(go(database_url))
    if as_json:
        _print_json({"key_id": row["id"], "api_key": secret, "workspace_id": chosen})
    else:
        click.echo(key_line(row) + f"\napi key {secret}  (shown once; workspace {chosen})")


@keys.command("list")
@workspace_option
@click.option("--json", "as_json", is_flag=True)
@data_dir_option
def keys_list(workspace_id: str | None, as_json: bool, data_dir: Path | None) -> None:
    """List a workspace's keys (prefixes only: secrets are never stored)."""
    from switchboard.api import render
    from switchboard.render_cli import key_line

    async def go(database_url: str) -> list[Any]:
        chosen = await _chosen_workspace(database_url, workspace_id)
        async with _database(database_url) as database, database.workspace(chosen) as conn:
            return list(await conn.fetch("SELECT * FROM api_keys ORDER BY seq"))

    with _backends(_settings(data_dir=data_dir)) as (database_url, _nats):
        rows = _run(go(database_url))
    if as_json:
        _print_json([render.api_key(r) for r in rows])
    else:
        for row in rows:
            click.echo(key_line(row))


@keys.command("revoke")
@click.argument("key_id")
@data_dir_option
def keys_revoke(key_id: str, data_dir: Path | None) -> None:
    """Revoke a key: it stops working at once on every replica that shares the bus."""
    import asyncpg

    from switchboard.bus import connect_bus

    async def go(database_url: str, nats_url: str | None) -> bool:
        # As the owner: revocation by id is an operator action that crosses workspaces.
        owner = await asyncpg.connect(database_url)
        try:
            found = await owner.fetchval(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 "
                "RETURNING id",
                key_id,
            )
        finally:
            await owner.close()
        if found and nats_url:
            bus = await connect_bus(nats_url, name="switchboard-cli")
            try:
                await bus.announce_key_revoked(key_id)
            finally:
                await bus.close()
        return bool(found)

    settings = _settings(data_dir=data_dir)
    with _backends(settings) as (database_url, nats_url):
        found = _run(go(database_url, nats_url))
    if not found:
        click.echo(f"no key {key_id}", err=True)
        sys.exit(1)
    click.echo(f"revoked {key_id}")


@main.command()
@click.option(
    "--workspace",
    "workspace_id",
    default=None,
    help="ws_... to simulate in (default: the first workspace).",
)
@click.option("--calls", type=click.IntRange(0, 10_000), default=3, help="Concurrent calls.")
@click.option("--conversations", type=click.IntRange(0, 10_000), default=2)
@click.option("--seed", type=int, default=None, help="Makes a run repeatable.")
@click.option(
    "--pace",
    type=click.FloatRange(0.001, 100),
    default=1.0,
    help="Multiplies every delay (0.1 plays ten times faster).",
)
@click.option("--forever", is_flag=True, help="Keep starting new calls until Ctrl-C.")
@data_dir_option
def simulate(
    workspace_id: str | None,
    calls: int,
    conversations: int,
    seed: int | None,
    pace: float,
    forever: bool,
    data_dir: Path | None,
) -> None:
    """Simulate calls and conversations on the bus, and play the media plane (calls placed with
    POST /v1/calls, DTMF, hang-ups) for the workspace."""
    import nats

    from switchboard.bus.connection import nats_credentials, nats_servers
    from switchboard.server import first_workspace
    from switchboard.simulate import SimulationPlan, Simulator

    async def go(database_url: str, nats_url: str) -> None:
        target = workspace_id or await first_workspace(database_url)
        if target is None:
            raise click.ClickException("no workspace yet: run `switchboard serve` once first")
        servers = nats_servers(nats_url)
        client = await nats.connect(
            servers=servers, name="switchboard-simulate", **nats_credentials(servers)
        )
        simulator = Simulator(
            client, SimulationPlan(target, calls, conversations, seed, pace, forever)
        )
        try:
            await simulator.start()
            click.echo(f"simulating in {target}: {calls} calls, {conversations} conversations")
            await simulator.wait()
        finally:
            await simulator.stop()
            await client.close()

    settings = _settings(data_dir=data_dir)
    with _backends(settings) as (database_url, nats_url):
        if not nats_url:
            raise click.ClickException(
                "no NATS to publish to: start `switchboard serve` or set SWITCHBOARD_NATS_URL"
            )
        _run(go(database_url, nats_url))


def _urls(_context: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    """Every --url, and SWITCHBOARD_URL, may hold several URLs, comma- or space-separated (the
    examples read SWITCHBOARD_URL the same way)."""
    return server_urls(*values)


def client_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`--url` (repeatable: replicas, tried in turn) and `--key`, for the commands that read
    streams as a client does; both fall back to SWITCHBOARD_URL and SWITCHBOARD_API_KEY."""
    command = click.option(
        "--key",
        envvar="SWITCHBOARD_API_KEY",
        default=None,
        help="API key; better in SWITCHBOARD_API_KEY (a flag shows in the process list).",
    )(command)
    return click.option(
        "--url",
        "urls",
        multiple=True,
        envvar="SWITCHBOARD_URL",
        callback=_urls,
        help=f"The server (default {DEFAULT_URL}, or SWITCHBOARD_URL); repeat it, or separate "
        "URLs with commas, to name replicas, tried in turn when one is down or draining.",
    )(command)


def _required_key(key: str | None) -> str:
    if not key:
        raise click.UsageError(
            "no API key: set SWITCHBOARD_API_KEY=pk_live_... (the key `serve` printed at its "
            "first start, or one from `switchboard keys create`), or pass --key"
        )
    return key


@main.command("tail")
@click.argument("stream_id")
@client_options
@click.option(
    "--from-start", is_flag=True, help="A call: print every final turn so far first, then follow."
)
@click.option(
    "--event-types",
    default="",
    help="events: only these types, comma-separated; a trailing * matches a prefix (message.*).",
)
def tail_command(
    stream_id: str, urls: list[str], key: str | None, from_start: bool, event_types: str
) -> None:
    """Follow a call's live transcript (call_...), a conversation (conv_...) or every event of
    the workspace (events). Reconnects resume where they left off."""
    from switchboard.client import StreamClosed, StreamError
    from switchboard.client.tail import WORKSPACE, tail

    if not stream_id.startswith(("call_", "conv_")) and stream_id != WORKSPACE:
        raise click.BadParameter(
            f"must be a call_... or conv_... id, or {WORKSPACE}", param_hint="STREAM_ID"
        )
    if from_start and not stream_id.startswith("call_"):
        raise click.BadParameter("only a call's transcript starts over", param_hint="--from-start")
    types = [kind.strip() for kind in event_types.split(",") if kind.strip()]
    if types and stream_id != WORKSPACE:
        raise click.BadParameter(f"only for {WORKSPACE}", param_hint="--event-types")
    api_key = _required_key(key)
    try:
        _run(tail(urls, api_key, stream_id, from_start=from_start, event_types=types))
    except (StreamError, StreamClosed) as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        pass


@main.command("listen")
@click.argument("call_id")
@click.option(
    "-o",
    "--output",
    required=True,
    help="A WAV file to write (16 kHz, mono, 16-bit), or - for raw PCM on stdout.",
)
@client_options
def listen_command(call_id: str, output: str, urls: list[str], key: str | None) -> None:
    """Listen to a live call (call_...) until it ends or Ctrl-C: write its audio to a WAV file,
    or raw PCM to stdout (`-o - | play -t raw -r 16k -e signed -b 16 -c 1 -`)."""
    from switchboard.client import StreamClosed, StreamError
    from switchboard.client.record import STDOUT, record

    if not call_id.startswith("call_"):
        raise click.BadParameter("must be a call_... id", param_hint="CALL_ID")
    if output == STDOUT and sys.stdout.isatty():
        raise click.BadParameter("raw PCM would go to the terminal", param_hint="--output")
    api_key = _required_key(key)
    try:
        _run(record(urls, api_key, call_id, output))
    except (StreamError, StreamClosed) as error:
        raise click.ClickException(str(error)) from None
    except BrokenPipeError:  # the player went away: stop quietly, as `head` would have us
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as error:  # the file cannot be written
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        pass


@main.group()
def events() -> None:
    """See and replay events the recorder or the webhook router parked."""


@events.command("parked")
@click.option("--workspace", "workspace_id", required=True, help="ws_... id.")
@click.option("--json", "as_json", is_flag=True)
@data_dir_option
def events_parked(workspace_id: str, as_json: bool, data_dir: Path | None) -> None:
    """List events waiting for their call or conversation, and events given up on."""
    from switchboard.bus import parking

    async def go(database_url: str) -> list[dict[str, Any]]:
        async with _database(database_url) as database, database.workspace(workspace_id) as conn:
            return await parking.parked(conn)

    with _backends(_settings(data_dir=data_dir)) as (database_url, _nats):
        rows = _run(go(database_url))
    if as_json:
        _print_json(rows)
        return
    for row in rows:
        click.echo(
            f"{row['event_id']}  {row['status']:<7}  {row['event_type']:<26}  {row['consumer']}"
            f"  {row['reason']}"
        )


@events.command("replay")
@click.argument("event_id")
@click.option("--workspace", "workspace_id", required=True, help="ws_... id.")
@data_dir_option
def events_replay(event_id: str, workspace_id: str, data_dir: Path | None) -> None:
    """Apply a parked event again, through the consumer that parked it."""
    from switchboard.bus.replay import replay

    async def go(database_url: str) -> list[tuple[str, str]]:
        async with _database(database_url) as database:
            return await replay(database, workspace_id, event_id)

    with _backends(_settings(data_dir=data_dir)) as (database_url, _nats):
        outcomes = _run(go(database_url))
    if not outcomes:
        raise click.ClickException(f"no parked event {event_id} in {workspace_id}")
    for consumer, outcome in outcomes:
        click.echo(f"{event_id}  {consumer}: {outcome}")
