"""The recorder's I/O shell: a durable JetStream pull consumer of the `.events` subjects. Each
event is written in one transaction and acknowledged only after it commits; a crash anywhere
means a redelivery, which the effects ignore."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import orjson
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import FetchTimeoutError

from switchboard.bus import Bus
from switchboard.db import Database
from switchboard.events import EVENTS_STREAM, EventError, check_envelope
from switchboard.recorder.effects import NotYet, UnknownWorkspace, apply

log = logging.getLogger(__name__)

DURABLE = "recorder"
BATCH = 64
RETRY_DELAY = 1.0  # seconds before an out-of-order event is tried again


class Recorder:
    def __init__(
        self,
        database: Database,
        bus: Bus,
        *,
        durable: str = DURABLE,
        filter_subject: str = "vb.>",
    ) -> None:
        """`durable` names the consumer every recorder replica shares (they split the work);
        `filter_subject` narrows it (tests give each recorder its own workspace)."""
        self.database = database
        self.bus = bus
        self.durable = durable
        self.filter_subject = filter_subject
        self.recorded = 0
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
                log.warning("recorder: fetch failed; retrying", exc_info=True)
                await asyncio.sleep(RETRY_DELAY)
                continue
            for message in messages:
                await self._record(message)

    async def _record(self, msg: Msg) -> None:
        try:
            envelope = orjson.loads(msg.data)
            check_envelope(envelope)
        except (orjson.JSONDecodeError, EventError, TypeError) as bad:
            log.error("recorder: dropped an event that does not fit the catalogue: %s", bad)
            await msg.term()
            return
        try:
            async with self.database.workspace(envelope["workspace_id"]) as conn:
                await apply(conn, envelope)
        except UnknownWorkspace as unknown:
            log.error("recorder: dropped an event of unknown workspace %s", unknown)
            await msg.term()
            return
        except NotYet as later:
            log.info("recorder: %s; retrying", later)
            await msg.nak(delay=RETRY_DELAY)
            return
        except Exception:
            log.exception("recorder: could not write event %s", envelope.get("event_id"))
            await msg.nak(delay=RETRY_DELAY)
            return
        await msg.ack()
        self.recorded += 1
