"""The hub: per replica, one NATS subscription per watched subject however many clients watch
it. Each message is decoded once, encoded once per view (an SSE frame, a WebSocket text), and
the same bytes are offered to every watcher's outbox. Offers never block the subscriber."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from switchboard.events import subject_mismatch
from switchboard.live.frames import Ending, Terminal, sse_data
from switchboard.live.metrics import Metrics
from switchboard.live.outbox import Item, Outbox

log = logging.getLogger(__name__)

TURN_FIELDS = ("role", "text", "is_final", "turn_id", "ts")
REJECTED_METRIC = "switchboard_live_messages_rejected_total"
REJECT_LOG_EVERY = 60.0


class View(Enum):
    """How one kind of stream sees the messages of a subject."""

    TRANSCRIPT = "transcript"  # .transcript -> SSE turn frames
    TRANSCRIPT_END = "transcript_end"  # .events -> only the end of the call
    CALL_EVENTS = "call_events"  # .events -> WebSocket envelopes, then the end
    CONVERSATION = "conversation"  # conversation .events -> SSE envelope frames


def encode(view: View, message: dict[str, Any], seq: int) -> list[Item]:
    """The wire items one message becomes for one view (pure; the hub calls it once per view)."""
    completed = message.get("event_type") == "call.completed"
    if view is View.TRANSCRIPT:
        if not all(name in message for name in TURN_FIELDS):
            return []
        turn = {name: message[name] for name in TURN_FIELDS}
        return [sse_data(seq, orjson.dumps(turn))]
    if view is View.TRANSCRIPT_END:
        return [Terminal(Ending.CALL_COMPLETED)] if completed else []
    if view is View.CALL_EVENTS:
        frame: list[Item] = [orjson.dumps(message).decode()]
        return [*frame, Terminal(Ending.CALL_COMPLETED)] if completed else frame
    return [sse_data(seq, orjson.dumps(message))]


@dataclass
class Topic:
    subject: str
    workspace_id: str
    # Ids only grow on this replica, across resubscriptions too: seeded from the clock in µs.
    seq: int = field(default_factory=lambda: time.time_ns() // 1000)
    subscription: Subscription | None = None
    watchers: dict[View, set[Outbox]] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def envelopes(self) -> bool:
        """An `.events` subject: every message on it is an envelope (a turn is not)."""
        return self.subject.endswith(".events")

    def empty(self) -> bool:
        return not any(self.watchers.values())


class Hub:
    def __init__(self, client: Client, metrics: Metrics) -> None:
        self.client = client
        self.metrics = metrics
        self.topics: dict[str, Topic] = {}
        metrics.bus_subscriptions = self.subscription_count
        self.rejected = metrics.counter(
            REJECTED_METRIC,
            "Bus messages the live hub dropped before any client saw them.",
            "reason",
        )
        self._last_reject_log = -REJECT_LOG_EVERY

    def subscription_count(self) -> int:
        return sum(1 for topic in self.topics.values() if topic.subscription is not None)

    async def watch(self, subject: str, workspace_id: str, view: View, outbox: Outbox) -> None:
        """Adds a watcher; on the first one, subscribes and waits until NATS has registered the
        subscription, so the caller may read state afterwards without missing a message."""
        while True:
            topic = self.topics.setdefault(subject, Topic(subject, workspace_id))
            async with topic.lock:
                if self.topics.get(subject) is not topic:
                    continue  # removed while we waited for its lock: start over
                topic.watchers.setdefault(view, set()).add(outbox)
                if topic.subscription is None:
                    try:
                        topic.subscription = await self.client.subscribe(
                            subject, cb=self._receiver(topic)
                        )
                        await self.client.flush(timeout=5)
                    except BaseException:
                        topic.watchers[view].discard(outbox)
                        await self._release(topic)
                        raise
                return

    async def unwatch(self, subject: str, view: View, outbox: Outbox) -> None:
        topic = self.topics.get(subject)
        if topic is None:
            return
        async with topic.lock:
            topic.watchers.get(view, set()).discard(outbox)
            if topic.empty():
                await self._release(topic)

    async def _release(self, topic: Topic) -> None:
        if self.topics.get(topic.subject) is topic and topic.empty():
            del self.topics[topic.subject]
            if topic.subscription is not None:
                subscription, topic.subscription = topic.subscription, None
                try:
                    await subscription.unsubscribe()
                except Exception:  # the connection is closing; the server drops it anyway
                    log.debug("unsubscribe failed", exc_info=True)

    def _receiver(self, topic: Topic) -> Callable[[Msg], Any]:
        async def receive(msg: Msg) -> None:
            self.metrics.bus_messages += 1
            try:
                message = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                log.warning("dropped a message that is not JSON", extra={"subject": msg.subject})
                return
            if not isinstance(message, dict):
                return
            # The subject is the authority (SPEC 7): an envelope naming another workspace, call
            # or conversation never reaches a client. Turns carry no workspace to compare.
            if topic.envelopes:
                mismatch = subject_mismatch(topic.subject, message)
            elif "workspace_id" in message and message["workspace_id"] != topic.workspace_id:
                mismatch = "workspace_id differs from the subject's"
            else:
                mismatch = None
            if mismatch is not None:
                self._reject(mismatch)
                return
            topic.seq += 1
            # No await below: the watcher sets cannot change while we walk them, so no copies.
            for view, outboxes in topic.watchers.items():
                if not outboxes:
                    continue
                for item in encode(view, message, topic.seq):
                    for outbox in outboxes:
                        if isinstance(item, Terminal):
                            outbox.end(item)
                        else:
                            outbox.offer(item)

        return receive

    def _reject(self, why: str) -> None:
        """Counted always; logged at most once a minute (a producer could fill the log)."""
        self.rejected["subject_mismatch"] += 1
        now = time.monotonic()
        if now - self._last_reject_log >= REJECT_LOG_EVERY:
            self._last_reject_log = now
            log.warning(
                "dropped a message for live streams: %s (counted in %s)", why, REJECTED_METRIC
            )
