"""One `/metrics` for a whole `serve --workers N`: a scrape lands on whichever process the
kernel gives the connection to, so that process asks its siblings (every process of the same
serve, over NATS) for their values and answers with the sum. Without this a scraper would see
one worker's counters at a time, jumping between them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError

from switchboard.live.metrics import Metrics

log = logging.getLogger(__name__)

GATHER_TIMEOUT = 1.0  # seconds to wait for every sibling's answer


def subject_of(serve_id: str) -> str:
    return f"_switchboard.metrics.{serve_id}"


class SiblingMetrics:
    def __init__(self, client: Client, metrics: Metrics, serve_id: str, processes: int) -> None:
        self.client = client
        self.metrics = metrics
        self.subject = subject_of(serve_id)
        self.processes = processes
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        self._subscription = await self.client.subscribe(self.subject, cb=self._answer)

    async def _answer(self, msg: Msg) -> None:
        if msg.reply:
            with contextlib.suppress(NatsError):
                await self.client.publish(msg.reply, orjson.dumps(self.metrics.snapshot()))

    async def render(self) -> str:
        """Every process's values summed (this one's included, through the bus like the
        others'), with how many answered; this process's own if the bus cannot be used."""
        snapshots: list[dict[str, Any]] = []
        inbox = self.client.new_inbox()
        answers: asyncio.Queue[bytes] = asyncio.Queue()

        async def collect(msg: Msg) -> None:
            answers.put_nowait(msg.data)

        try:
            subscription = await self.client.subscribe(inbox, cb=collect)
            try:
                await self.client.publish(self.subject, b"", reply=inbox)
                async with asyncio.timeout(GATHER_TIMEOUT):
                    while len(snapshots) < self.processes:
                        snapshots.append(orjson.loads(await answers.get()))
            except TimeoutError:
                log.warning("metrics: %d of %d processes answered", len(snapshots), self.processes)
            finally:
                with contextlib.suppress(NatsError):
                    await subscription.unsubscribe()
        except NatsError:
            snapshots = []
        if not snapshots:
            snapshots = [self.metrics.snapshot()]
        reporting = (
            "# HELP switchboard_processes_reporting Processes of this serve whose values are "
            "summed here.\n# TYPE switchboard_processes_reporting gauge\n"
            f"switchboard_processes_reporting {len(snapshots)}\n"
        )
        return Metrics.merged(snapshots).render() + reporting

    async def stop(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(NatsError):
                await self._subscription.unsubscribe()
