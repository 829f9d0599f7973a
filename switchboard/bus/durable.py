"""A durable JetStream pull consumer of the `.events` subjects that hands each event to a
handler inside one workspace-scoped transaction and acknowledges it only after that commits: a
crash anywhere means a redelivery, which handlers must make harmless (they are idempotent).
The recorder and the webhook router are both one of these."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import FetchTimeoutError

from switchboard.bus import Bus, parking
from switchboard.db import Connection, Database
from switchboard.db.scoped import savepoint
from switchboard.events import EVENTS_STREAM, EventError, check_envelope, subject_mismatch
from switchboard.live.metrics import Metrics
from switchboard.outage import OutageLog, unavailable_dependency
from switchboard.stopping import cancel_and_wait

log = logging.getLogger(__name__)

BATCH = 64
# Seconds a caught-up consumer waits before its next fetch: what it adds to an event's way to
# the database and its webhooks, for batches instead of a transaction per event. What a batch
# costs is now mostly per batch (a fetch, a transaction), so 50 ms rather than 25 ms cut the
# CPU per event by a fifth at 250 events/s; a webhook waits for its sender's 0.5 s poll anyway.
LINGER = 0.05
RETRY_DELAY = 1.0  # seconds before a failed event is tried again
MAX_ATTEMPTS = 3  # deliveries of an event that fails for a reason other than an outage
WAIT_LIMIT = 3600.0  # seconds an event may wait for its call or conversation before parking
SWEEP_EVERY = 60.0  # seconds between sweeps for events that waited too long
REJECT_LOG_EVERY = 60.0  # seconds between log lines about rejected envelopes


Handler = Callable[[Connection, dict[str, Any]], Awaitable[object]]
# Applies one workspace's events, in order, inside the caller's transaction and without
# savepoints; raises on the first event it cannot apply (NotYet included), and the consumer then
# applies the batch again one event at a time, each in a savepoint, to settle each on its own.
BatchHandler = Callable[[Connection, list[dict[str, Any]]], Awaitable[object]]


class NotYet(Exception):
    """The event refers to `parent_id` (a call or conversation) that an earlier event will
    record (replicas and producers may run out of order): keep it until that one is."""

    def __init__(self, parent_id: str, message: str) -> None:
        super().__init__(message)
        self.parent_id = parent_id


class Unrecordable(Exception):
    """The event can never be handled (e.g. its workspace does not exist): drop it, loudly."""


class EventConsumer:
    def __init__(
        self,
        database: Database,
        bus: Bus,
        handler: Handler,
        *,
        durable: str,
        batch_handler: BatchHandler | None = None,
        filter_subject: str = "vb.>",
        metrics: Metrics | None = None,
        wait_limit: float = WAIT_LIMIT,
    ) -> None:
        """`durable` names the consumer every replica of this role shares (they split the
        work); `filter_subject` narrows it (tests give each consumer its own workspace);
        `batch_handler` applies a whole batch with fewer statements than `handler` one by one
        (by default it is `handler` one by one, still without savepoints)."""
        self.database = database
        self.bus = bus
        self.handler = handler
        self.batch_handler = batch_handler or self._one_by_one
        self.durable = durable
        self.filter_subject = filter_subject
        self.wait_limit = wait_limit
        self.handled = 0
        metrics = metrics or Metrics()
        self.rejected = metrics.counter(
            "switchboard_events_rejected_total",
            "Envelopes a durable consumer dropped: not in the catalogue, or not matching the "
            "workspace and id of their subject.",
            "reason",
        )
        self.parked = metrics.counter(
            "switchboard_events_parked_total",
            "Events a durable consumer gave up on, kept in parked_events for replay.",
            "consumer",
        )
        self.outage = OutageLog(log, f"the database ({durable})")
        self._last_reject_log = -REJECT_LOG_EVERY
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._subscription: JetStreamContext.PullSubscription | None = None

    async def start(self) -> None:
        subscription = await self.bus.js.pull_subscribe(
            self.filter_subject,
            durable=self.durable,
            stream=EVENTS_STREAM,
            config=ConsumerConfig(
                durable_name=self.durable,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=30,
                max_ack_pending=1000,
            ),
        )
        self._subscription = subscription
        self._stopping = False
        self._tasks = [
            asyncio.create_task(self._run(subscription)),
            asyncio.create_task(self._sweep_forever()),
        ]

    async def stop(self) -> None:
        """Stops at once; whatever was not acknowledged is redelivered to the next consumer."""
        self._stopping = True  # nats-py's fetch can swallow a cancellation: the flag ends the loop
        await cancel_and_wait(self._tasks)
        self._tasks = []
        if self._subscription is not None:
            # Only this process's interest ends; the durable consumer stays for the others.
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None

    async def _run(self, subscription: JetStreamContext.PullSubscription) -> None:
        while not self._stopping:
            try:
                messages = await subscription.fetch(BATCH, timeout=1)
            except (FetchTimeoutError, NatsTimeout, TimeoutError):
                continue  # nothing to handle this second
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as failure:
                # The bus is down or reconnecting: nats-py says so itself, once per outage.
                log.debug("%s: fetch failed: %s", self.durable, type(failure).__name__)
                await asyncio.sleep(RETRY_DELAY)
                continue
            await self._handle_batch(messages)
            if len(messages) < BATCH:
                # Caught up: let the next events gather for a moment, so that a steady flow is
                # applied in batches (one transaction each) rather than one event per fetch.
                await asyncio.sleep(LINGER)

    async def _handle_batch(self, messages: list[Msg]) -> None:
        """A fetched batch: each workspace's events in one transaction, in order, acknowledged
        after the commit. One commit (one WAL flush) per workspace per batch instead of one per
        event is most of what recording costs the database when calls are busy.

        The transaction first tries the whole batch at once (`batch_handler`: no savepoint per
        event, multi-row statements), which is what a healthy flow of events needs. Only if that
        fails is the batch applied again with each event in a savepoint, so that the one that
        failed is settled on its own (kept waiting, retried, parked) and does not undo the
        others; and if that transaction fails too (an outage, a deadlock with another
        replica), the events go one by one, as if fetched one at a time."""
        groups: dict[str, list[tuple[Msg, dict[str, Any]]]] = {}
        for msg in messages:
            envelope = await self._checked(msg)
            if envelope is not None:
                groups.setdefault(envelope["workspace_id"], []).append((msg, envelope))
        for workspace_id, events in groups.items():
            try:
                await self._apply_at_once(workspace_id, [envelope for _msg, envelope in events])
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as failure:
                if unavailable_dependency(failure) is None and len(events) > 1:
                    await self._handle_in_savepoints(workspace_id, events)
                else:
                    for msg, envelope in events:
                        await self._handle(msg, envelope)
                continue
            self.outage.recovered()
            for msg, _envelope in events:
                await msg.ack()
            self.handled += len(events)

    async def _apply_at_once(self, workspace_id: str, envelopes: list[dict[str, Any]]) -> None:
        """One workspace's events in one transaction with no savepoints: all or nothing."""
        async with self.database.workspace(workspace_id) as conn:
            await self.batch_handler(conn, envelopes)

    async def _one_by_one(self, conn: Connection, envelopes: list[dict[str, Any]]) -> None:
        for envelope in envelopes:
            await self.handler(conn, envelope)

    async def _handle_in_savepoints(
        self, workspace_id: str, events: list[tuple[Msg, dict[str, Any]]]
    ) -> None:
        """A batch that failed at once: each event in a savepoint of one transaction."""
        try:
            outcomes = await self._apply_together(workspace_id, events)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception:
            for msg, envelope in events:
                await self._handle(msg, envelope)
            return
        self.outage.recovered()
        for (msg, envelope), failure in zip(events, outcomes, strict=True):
            await self._settle(msg, envelope, failure)

    async def _checked(self, msg: Msg) -> dict[str, Any] | None:
        """The message's envelope, or None once it has been rejected for good."""
        try:
            envelope = orjson.loads(msg.data)
            check_envelope(envelope)
        except (orjson.JSONDecodeError, EventError, TypeError) as bad:
            await self._reject(msg, "not_in_catalogue", str(bad))
            return None
        mismatch = subject_mismatch(msg.subject, envelope)
        if mismatch is not None:
            await self._reject(msg, "subject_mismatch", mismatch)
            return None
        return envelope  # type: ignore[no-any-return]

    async def _apply_together(
        self, workspace_id: str, events: list[tuple[Msg, dict[str, Any]]]
    ) -> list[Exception | None]:
        """Applies one workspace's events in one transaction; returns each one's failure (None:
        applied, or kept waiting for its parent). An outage fails the whole transaction."""
        outcomes: list[Exception | None] = []
        async with self.database.workspace(workspace_id) as conn:
            for _msg, envelope in events:
                try:
                    async with savepoint(conn):
                        await self._apply_in(conn, envelope)
                    outcomes.append(None)
                except (asyncio.CancelledError, KeyboardInterrupt):
                    raise
                except Exception as failure:
                    if unavailable_dependency(failure) is not None:
                        raise
                    outcomes.append(failure)
        return outcomes

    async def _settle(self, msg: Msg, envelope: dict[str, Any], failure: Exception | None) -> None:
        """Acknowledges an event whose effects are committed, or deals with its failure."""
        if failure is None:
            await msg.ack()
            self.handled += 1
        elif isinstance(failure, Unrecordable):
            log.error("%s: dropped event %s: %s", self.durable, envelope["event_id"], failure)
            await msg.term()
        else:
            await self._failed(msg, envelope, failure)

    async def _handle(self, msg: Msg, envelope: dict[str, Any]) -> None:
        """One event in a transaction of its own."""
        try:
            await self._apply(envelope)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as failure:
            await self._settle(msg, envelope, failure)
            return
        self.outage.recovered()
        await self._settle(msg, envelope, None)

    async def _apply(self, envelope: dict[str, Any]) -> None:
        """Applies the event in a transaction of its own."""
        async with self.database.workspace(envelope["workspace_id"]) as conn:
            await self._apply_in(conn, envelope)

    async def _apply_in(self, conn: Connection, envelope: dict[str, Any]) -> None:
        """Applies the event, or keeps it waiting for the call or conversation it needs."""
        try:
            async with savepoint(conn):  # a NotYet undoes what it began
                await self.handler(conn, envelope)
            return
        except NotYet as later:
            parent_id = later.parent_id
        await parking.hold_parent(conn, parent_id)
        try:
            async with savepoint(conn):  # the parent may be recorded by now
                await self.handler(conn, envelope)
        except NotYet as still:
            await parking.wait_for(conn, self.durable, envelope, still.parent_id, str(still))

    async def _failed(self, msg: Msg, envelope: dict[str, Any], failure: Exception) -> None:
        """An outage is retried without limit and logged once; anything else is a bug or a
        poison event: retried a few times, then parked, so it cannot hold up the others."""
        if unavailable_dependency(failure) is not None:
            self.outage.failed(failure)
            await msg.nak(delay=RETRY_DELAY)
            return
        attempts = msg.metadata.num_delivered or 1
        event_id = envelope["event_id"]
        if attempts < MAX_ATTEMPTS:
            log.warning(
                "%s: event %s failed (attempt %d of %d): %s",
                self.durable,
                event_id,
                attempts,
                MAX_ATTEMPTS,
                type(failure).__name__,
            )
            await msg.nak(delay=RETRY_DELAY * attempts)
            return
        reason = f"failed {attempts} times; last: {type(failure).__name__}: {failure}"
        try:
            async with self.database.workspace(envelope["workspace_id"]) as conn:
                await parking.park(conn, self.durable, envelope, reason)
        except Exception as parking_failed:
            self.outage.failed(parking_failed)
            await msg.nak(delay=RETRY_DELAY)
            return
        self.parked[self.durable] += 1
        log.error("%s: parked event %s after %d attempts", self.durable, event_id, attempts)
        await msg.ack()

    async def _reject(self, msg: Msg, reason: str, detail: str) -> None:
        """Drops an envelope for good: counted always, logged at most once a minute (a producer
        could otherwise fill the log)."""
        self.rejected[reason] += 1
        now = time.monotonic()
        if now - self._last_reject_log >= REJECT_LOG_EVERY:
            self._last_reject_log = now
            log.error(
                "%s: dropped an envelope (%s): %s; counted in switchboard_events_rejected_total",
                self.durable,
                reason,
                detail,
            )
        await msg.term()

    async def sweep(self) -> int:
        """Parks the events that have waited longer than `wait_limit`; returns how many."""
        async with self.database.pool.acquire() as conn:
            rows = await conn.fetch("SELECT * FROM park_stale_waiting($1)", self.wait_limit)
        self.parked[self.durable] += len(rows)
        if rows:
            log.error(
                "%s: parked %d events whose call or conversation never appeared within %.0f s "
                "(see `switchboard events parked`)",
                self.durable,
                len(rows),
                self.wait_limit,
            )
        return len(rows)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            try:
                await self.sweep()
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as failure:
                if unavailable_dependency(failure) is None:
                    log.exception("%s: sweep failed", self.durable)
                else:
                    self.outage.failed(failure)
