"""A durable JetStream pull consumer of the `.events` subjects that hands each event to a
handler inside one workspace-scoped transaction and acknowledges it only after that commits: a
crash anywhere means a redelivery, which handlers must make harmless (they are idempotent).
The recorder and the webhook router are both one of these."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import FetchTimeoutError

from switchboard.bus import Bus
from switchboard.db import Connection, Database
from switchboard.events import EVENTS_STREAM, EventError, check_envelope

log = logging.getLogger(__name__)

BATCH = 64
RETRY_DELAY = 1.0  # seconds before an out-of-order event is tried again


Handler = Callable[[Connection, dict[str, Any]], Awaitable[object]]


class NotYet(Exception):
    """The event refers to a row that an earlier event will create (replicas may process out
    of order): retry it later rather than lose it."""


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
        filter_subject: str = "vb.>",
    ) -> None:
        """`durable` names the consumer every replica of this role shares (they split the
        work); `filter_subject` narrows it (tests give each consumer its own workspace)."""
        self.database = database
        self.bus = bus
        self.handler = handler
        self.durable = durable
        self.filter_subject = filter_subject
        self.handled = 0
        self._task: asyncio.Task[None] | None = None
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
        self._task = asyncio.create_task(self._run(subscription))

    async def stop(self) -> None:
        """Stops at once; whatever was not acknowledged is redelivered to the next recorder."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._subscription is not None:
            # Only this process's interest ends; the durable consumer stays for the others.
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None

    async def _run(self, subscription: JetStreamContext.PullSubscription) -> None:
        while True:
            try:
                messages = await subscription.fetch(BATCH, timeout=1)
            except (FetchTimeoutError, NatsTimeout, TimeoutError):
                continue  # nothing to record this second
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception:
                log.warning("%s: fetch failed; retrying", self.durable, exc_info=True)
                await asyncio.sleep(RETRY_DELAY)
                continue
            for message in messages:
                await self._record(message)

    async def _record(self, msg: Msg) -> None:
        try:
            envelope = orjson.loads(msg.data)
            check_envelope(envelope)
        except (orjson.JSONDecodeError, EventError, TypeError) as bad:
            log.error("%s: dropped an event that does not fit the catalogue: %s", self.durable, bad)
            await msg.term()
            return
        try:
            async with self.database.workspace(envelope["workspace_id"]) as conn:
                await self.handler(conn, envelope)
        except Unrecordable as unknown:
            log.error("%s: dropped event %s: %s", self.durable, envelope.get("event_id"), unknown)
            await msg.term()
            return
        except NotYet as later:
            log.info("%s: %s; retrying", self.durable, later)
            await msg.nak(delay=RETRY_DELAY)
            return
        except Exception:
            log.exception("%s: could not handle event %s", self.durable, envelope.get("event_id"))
            await msg.nak(delay=RETRY_DELAY)
            return
        await msg.ack()
        self.handled += 1
