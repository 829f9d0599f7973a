"""The one NATS connection of a process, the JetStream stream of events, and publishing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import RePublish, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError

from switchboard.events import (
    EVENTS_STREAM,
    EVENTS_SUBJECTS,
    KEY_REVOKED_SUBJECT,
    TRANSCRIPT_SUBJECTS,
    TRANSCRIPTS_STREAM,
    live_subject,
    subject_for,
)
from switchboard.outage import OutageLog

log = logging.getLogger(__name__)

EVENT_RETENTION_SECONDS = 7 * 24 * 3600  # longer than the 24 h webhook window, with room to spare
DUPLICATE_WINDOW_SECONDS = 120.0
DEFAULT_HISTORY_SECONDS = 24 * 3600.0  # SWITCHBOARD_HISTORY_HOURS
PUBLISH_TIMEOUT = 5.0


async def store_envelope(js: JetStreamContext, envelope: Mapping[str, Any]) -> None:
    """Stores an envelope on its `.events` subject, deduplicated on its event_id; returns only
    once the server acknowledged it. The producer API stores through here; the REST API's
    events go through the outbox relay (`event_outbox`), which publishes the same way."""
    await js.publish(
        subject_for(envelope),
        orjson.dumps(envelope),
        timeout=PUBLISH_TIMEOUT,
        headers={"Nats-Msg-Id": envelope["event_id"]},
    )


class Bus:
    def __init__(
        self, client: Client, *, history_seconds: float = DEFAULT_HISTORY_SECONDS, replicas: int = 1
    ) -> None:
        self.client = client
        self.js = client.jetstream()
        self.history_seconds = history_seconds
        self.replicas = replicas
        # Run after every reconnect: core NATS does not redeliver what a subscriber missed.
        self.reconnect_listeners: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._reconnect_tasks: set[asyncio.Task[None]] = set()

    def reconnected(self) -> None:
        for listener in self.reconnect_listeners:
            task = asyncio.create_task(listener())
            self._reconnect_tasks.add(task)
            task.add_done_callback(self._reconnect_tasks.discard)

    @property
    def connected(self) -> bool:
        return bool(self.client.is_connected)

    def stream_configs(self) -> list[StreamConfig]:
        """The two streams: every envelope (for the durable consumers, 7 days, longer than the
        24 h webhook window) and every transcript turn (for resume, the history window). Both
        republish what they store under `live.` with its sequence (the hub's live feed) and
        answer direct gets (resume reads history in batches)."""
        live = RePublish(src=">", dest=live_subject(">"))
        return [
            StreamConfig(
                name=EVENTS_STREAM,
                subjects=list(EVENTS_SUBJECTS),
                storage=StorageType.FILE,
                max_age=max(EVENT_RETENTION_SECONDS, self.history_seconds),
                duplicate_window=DUPLICATE_WINDOW_SECONDS,
                num_replicas=self.replicas,
                allow_direct=True,
                republish=live,
            ),
            StreamConfig(
                name=TRANSCRIPTS_STREAM,
                subjects=list(TRANSCRIPT_SUBJECTS),
                storage=StorageType.FILE,
                max_age=self.history_seconds,
                num_replicas=self.replicas,
                allow_direct=True,
                republish=live,
            ),
        ]

    async def ensure_streams(self) -> None:
        for config in self.stream_configs():
            try:
                await self.js.add_stream(config)
            except BadRequestError:
                # It exists with another config (an older version of ours): bring it up to date.
                await self.js.update_stream(config)

    async def publish(self, subject: str, body: bytes) -> None:
        """Core NATS publish, for live-only data such as transcript partials and commands."""
        await self.client.publish(subject, body)

    async def announce_key_revoked(self, key_id: str) -> None:
        await self.client.publish(KEY_REVOKED_SUBJECT, orjson.dumps({"key_id": key_id}))
        await self.client.flush(timeout=int(PUBLISH_TIMEOUT))

    async def on_key_revoked(self, callback: Callable[[str], Awaitable[None]]) -> Subscription:
        async def handle(msg: Msg) -> None:
            try:
                key_id = orjson.loads(msg.data)["key_id"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.warning("ignored a malformed key revocation announcement")
                return
            await callback(str(key_id))

        return await self.client.subscribe(KEY_REVOKED_SUBJECT, cb=handle)

    async def close(self) -> None:
        """Flushes what was published and closes. (Not `drain`: it waits up to 30 s for every
        subscription, including a JetStream pull that may be mid-fetch.)"""
        if not self.client.is_closed:
            with contextlib.suppress(Exception):
                await self.client.flush(timeout=2)
            await self.client.close()


def nats_servers(url: str) -> list[str]:
    """SWITCHBOARD_NATS_URL: one URL, or a cluster's nodes, comma-separated."""
    return [server.strip() for server in url.split(",") if server.strip()]


def nats_credentials(servers: list[str]) -> dict[str, Any]:
    """The credentials in the URLs as connect options too: nats-py adds the nodes a cluster
    announces to its pool without them, and those would refuse it."""
    found = {(parts.username, parts.password) for parts in map(urlsplit, servers)}
    user, password = found.pop() if len(found) == 1 else (None, None)
    if user is None:
        return {}
    if password is None:
        return {"token": unquote(user)}
    return {"user": unquote(user), "password": unquote(password)}


async def connect_bus(
    url: str,
    *,
    name: str = "switchboard",
    history_seconds: float = DEFAULT_HISTORY_SECONDS,
    replicas: int = 1,
) -> Bus:
    # nats-py reports every failed reconnect attempt; an outage logs when it starts and ends,
    # with a reminder in between, not a line a second.
    outage = OutageLog(log, "the bus (NATS)")

    async def on_error(error: Exception) -> None:
        if outage.down:
            outage.failed(error)
        else:
            log.warning("nats: %s", type(error).__name__)

    async def on_disconnect() -> None:
        if not client.is_closed and not client.is_draining:
            outage.failed(ConnectionError("disconnected; reconnecting"))

    async def on_reconnect() -> None:
        outage.recovered()
        bus.reconnected()

    servers = nats_servers(url)
    client = Client()
    await client.connect(
        # One URL, or a cluster's, comma-separated: the client fails over between them.
        servers=servers,
        **nats_credentials(servers),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    bus = Bus(client, history_seconds=history_seconds, replicas=replicas)
    await bus.ensure_streams()
    return bus
