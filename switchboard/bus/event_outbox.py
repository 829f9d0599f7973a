"""The transactional outbox (SPEC section 6, "No phantom writes"): a REST write stages its event
in Postgres in the same transaction as its rows, and the relay publishes committed events to
JetStream. A write that fails leaves no event, now or later; a write that commits has its event
on the bus exactly once, however long the bus is down and whichever replica relays it.

Order: the relay publishes in `seq` order and stops at the first failure, so no event overtakes
an earlier one. Two writes to the same call or conversation hold that row's lock until they
commit, so the later one takes its `seq` after the earlier one committed: `seq` order is commit
order per call and conversation.

Exactly once: each publish carries `Nats-Msg-Id` = `event_id`, so a re-publish inside JetStream's
duplicate window (a crash between publish and delete, a lost acknowledgement) is dropped by the
server. A row older than that window may have been stored by an earlier attempt whose trace the
server no longer keeps, so the relay first looks for its `event_id` in the subject's history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

import asyncpg
import orjson
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from switchboard.bus.connection import DUPLICATE_WINDOW_SECONDS, PUBLISH_TIMEOUT, Bus
from switchboard.db import Connection, Database
from switchboard.events import EVENTS_STREAM, subject_for
from switchboard.live.metrics import Metrics
from switchboard.outage import OutageLog, unavailable_dependency

log = logging.getLogger(__name__)

CHANNEL = "switchboard_event_outbox"  # NOTIFYed by the table's trigger at every commit
RELAY_LOCK_KEY = 0x5357_5245  # "SWRE": one active relay per database, the others stand by
BATCH = 256
POLL_SECONDS = 1.0  # a fallback wake-up, should a NOTIFY be lost with its connection
STANDBY_SECONDS = 2.0  # how often a standby relay tries to take over
RETRY_SECONDS = 0.5  # pause after the bus or the database refused
# Rows older than this may have been stored by an attempt the duplicate window no longer covers.
UNCERTAIN_AGE = DUPLICATE_WINDOW_SECONDS - 3 * PUBLISH_TIMEOUT
# The history check compares Postgres's clock (when a row was staged) with NATS's (when a message
# was stored): it reads from this long before the row, so clocks a minute apart still agree.
CLOCK_SKEW = timedelta(seconds=60)


async def stage_event(conn: Connection, envelope: Mapping[str, Any]) -> None:
    """Stages `envelope` for publishing when (and only if) the caller's transaction commits."""
    await conn.execute(
        """INSERT INTO event_outbox (workspace_id, event_id, subject, body)
           VALUES ($1, $2, $3, $4)""",
        envelope["workspace_id"],
        envelope["event_id"],
        subject_for(envelope),
        orjson.dumps(envelope),
    )


class BusRefused(Exception):
    """The bus did not store an event; the relay waits and retries from that event."""


class OutboxRelay:
    """Publishes staged events. Every replica runs one; a session advisory lock makes exactly
    one of them active, and a standby takes over within seconds when the active one dies."""

    def __init__(self, database: Database, bus: Bus, metrics: Metrics) -> None:
        self.database = database
        self.bus = bus
        self.outcomes = metrics.counter(
            "switchboard_outbox_events_total",
            "Events the outbox relay published, or found already stored.",
            "outcome",
        )
        self.database_outage = OutageLog(log, "the database (outbox relay)")
        self.bus_outage = OutageLog(log, "the bus (outbox relay)")
        self.active = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        """Stops at once: what was not yet published stays staged for the next relay."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                # The lock and the LISTEN outlive any transaction (db/database.py, session).
                async with self.database.session() as conn:
                    await self._relay(conn)
            except asyncio.CancelledError:
                raise
            except Exception as failure:
                if unavailable_dependency(failure) is None:
                    log.exception("outbox relay failed; restarting it")
                else:
                    self.database_outage.failed(failure)
            finally:
                self.active = False
            await asyncio.sleep(RETRY_SECONDS)

    async def _relay(self, conn: Connection) -> None:
        """Leads while `conn` lives: the advisory lock is the connection's, and the pool's reset
        releases it if the connection is handed back."""
        wake = asyncio.Event()

        def woken(*_: object) -> None:
            wake.set()

        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK_KEY):
            self.database_outage.recovered()
            await asyncio.sleep(STANDBY_SECONDS)
        await conn.add_listener(CHANNEL, woken)
        try:
            await self._lead(conn, wake)
        finally:
            with contextlib.suppress(Exception):
                await conn.remove_listener(CHANNEL, woken)

    async def _lead(self, conn: Connection, wake: asyncio.Event) -> None:
        self.active = True
        while True:
            wake.clear()
            try:
                more = await self._relay_batch(conn)
            except BusRefused:
                await asyncio.sleep(RETRY_SECONDS)
                continue
            self.database_outage.recovered()
            if not more:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_SECONDS):
                        await wake.wait()

    async def _relay_batch(self, conn: Connection) -> bool:
        """Publishes the oldest staged events in order; True when more are waiting."""
        rows = await conn.fetch("SELECT * FROM relay_outbox_batch($1)", BATCH)
        if not rows:
            return False
        if not self.bus.connected:
            # Publishing now would only fill the client's reconnect buffer.
            raise BusRefused()
        uncertain = [row for row in rows if row["age_seconds"] >= UNCERTAIN_AGE]
        stored = await self._already_stored(uncertain) if uncertain else set()
        done: list[int] = []
        try:
            for row in rows:
                if row["event_id"] in stored:
                    self.outcomes["already_stored"] += 1
                else:
                    await self._publish(row)
                    self.outcomes["published"] += 1
                done.append(row["seq"])
        finally:
            if done:
                await conn.execute("SELECT relay_outbox_done($1)", done)
        return len(rows) == BATCH

    async def _publish(self, row: asyncpg.Record) -> None:
        try:
            await self.bus.js.publish(
                row["subject"],
                bytes(row["body"]),
                timeout=PUBLISH_TIMEOUT,
                headers={"Nats-Msg-Id": row["event_id"]},
            )
        except asyncio.CancelledError:
            raise
        except Exception as failure:  # nats raises several unrelated types for "not stored"
            self.bus_outage.failed(failure)
            raise BusRefused() from None
        self.bus_outage.recovered()

    async def _already_stored(self, rows: Iterable[asyncpg.Record]) -> set[str]:
        """The event ids among `rows` that the stream already holds, read from each subject's
        history since shortly before the row was staged."""
        since: dict[str, Any] = {}
        for row in rows:
            subject, at = row["subject"], row["created_at"]
            since[subject] = min(since.get(subject, at), at)
        found: set[str] = set()
        try:
            for subject, start in since.items():
                found |= await self._stored_ids(subject, start - CLOCK_SKEW)
        except asyncio.CancelledError:
            raise
        except Exception as failure:
            self.bus_outage.failed(failure)
            raise BusRefused() from None
        return found

    async def _stored_ids(self, subject: str, start: Any) -> set[str]:
        subscription = await self.bus.js.pull_subscribe(
            subject,
            stream=EVENTS_STREAM,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME,
                opt_start_time=start,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=30.0,
                mem_storage=True,
            ),
        )
        ids: set[str] = set()
        try:
            pending = (await subscription.consumer_info()).num_pending
            while pending:
                for message in await subscription.fetch(min(pending, BATCH), timeout=5):
                    pending = message.metadata.num_pending
                    # The body, not the Nats-Msg-Id header: a producer may have left it out.
                    with contextlib.suppress(orjson.JSONDecodeError, TypeError, KeyError):
                        ids.add(str(orjson.loads(message.data)["event_id"]))
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        return ids
