"""The hub: per replica, one NATS subscription per watched subject however many clients watch
it. Each message is decoded once, encoded once per view (an SSE frame, a WebSocket text), and
the same bytes are offered to every watcher's outbox. Offers never block the subscriber.

Stored subjects are read from JetStream's `live.` republication (so frames carry cursors); a
call's audio is never stored, so its topic subscribes to the producers' core subject itself."""

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

from switchboard.bus.stored import stored_after
from switchboard.events import LIVE_PREFIX, live_subject, subject_mismatch
from switchboard.live.audio import CHUNK_BYTES, AudioChunk
from switchboard.live.cursor import PREFIXES, cursor_text
from switchboard.live.frames import Ending, Terminal, sse_data
from switchboard.live.lag import LoopLag
from switchboard.live.metrics import Metrics
from switchboard.live.outbox import Item, Outbox
from switchboard.outage import BusUnavailable

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
    AUDIO = "audio"  # a call's .audio (core NATS, not stored) -> WebSocket binary frames

    @property
    def stored(self) -> bool:
        """Whether the view's subject is stored (read from its `live.` republication)."""
        return self is not View.AUDIO


def cursor_of(view: View, message: dict[str, Any], stream: str, seq: int) -> str:
    """A frame's cursor in one view: the WebSocket's is the envelope's event_id (SPEC 5.3)."""
    if view is View.CALL_EVENTS:
        return str(message.get("event_id"))
    return cursor_text(stream, seq)


def turn_frame(message: dict[str, Any], cursor: str) -> bytes | None:
    """A transcript turn as its SSE frame, or None when the message is not a turn."""
    if not all(name in message for name in TURN_FIELDS):
        return None
    return sse_data(cursor, orjson.dumps({name: message[name] for name in TURN_FIELDS}))


def encode(view: View, message: dict[str, Any], cursor: str) -> list[Item]:
    """The wire items one message becomes for one view (pure; the hub calls it once per view;
    replays call it too, so a replayed frame is byte for byte its live copy)."""
    completed = message.get("event_type") == "call.completed"
    if view is View.TRANSCRIPT:
        frame = turn_frame(message, cursor)
        return [] if frame is None else [frame]
    if view is View.TRANSCRIPT_END:
        return [Terminal(Ending.CALL_COMPLETED)] if completed else []
    if view is View.CALL_EVENTS:
        text: list[Item] = [orjson.dumps(message).decode()]
        return [*text, Terminal(Ending.CALL_COMPLETED)] if completed else text
    return [sse_data(cursor, orjson.dumps(message))]


@dataclass
class Topic:
    subject: str  # as producers publish it (the hub subscribes to its `live.` republication)
    workspace_id: str
    stored: bool = True  # False: a core subject (audio), subscribed to directly
    subscription: Subscription | None = None
    watchers: dict[View, set[Outbox]] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The stored sequence of the last message delivered, and the stream it is in: what a
    # catch-up after a lost message or a reconnect reads on from. Delivery holds `delivering`,
    # so a catch-up and the live messages behind it stay in order.
    last_seq: int = 0
    stream: str | None = None
    delivering: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def envelopes(self) -> bool:
        """`.events` subjects (one, or a workspace's): every message is an envelope."""
        return self.subject.endswith(".events")

    def empty(self) -> bool:
        return not any(self.watchers.values())


class Hub:
    def __init__(self, client: Client, metrics: Metrics, lag: LoopLag | None = None) -> None:
        self.client = client
        self.metrics = metrics
        self.lag = lag or LoopLag()  # not started: never lagging
        self.shed = metrics.counter(
            "switchboard_audio_chunks_shed_total",
            "Audio chunks not sent to their listeners because the event loop was late "
            "(events first), by reason.",
            "reason",
        )
        self.topics: dict[str, Topic] = {}
        metrics.bus_subscriptions = self.subscription_count
        self.rejected = metrics.counter(
            REJECTED_METRIC,
            "Bus messages the live hub dropped before any client saw them.",
            "reason",
        )
        self._last_reject_log = -REJECT_LOG_EVERY
        self.caught_up = metrics.counter(
            "switchboard_live_caught_up_total",
            "Stored messages the hub read back because its subscription missed them.",
            "stream",
        )
        self.caught_up_failed = metrics.counter(
            "switchboard_live_catch_up_failed_total",
            "Catch-ups that could not read the stream's history; their clients were sent a "
            "gap notice to resume from.",
            "stream",
        )

    def subscription_count(self) -> int:
        return sum(1 for topic in self.topics.values() if topic.subscription is not None)

    async def watch(self, subject: str, workspace_id: str, view: View, outbox: Outbox) -> None:
        """Adds a watcher; on the first one, subscribes and waits until NATS has registered the
        subscription, so the caller may read state afterwards without missing a message."""
        while True:
            topic = self.topics.setdefault(subject, Topic(subject, workspace_id, view.stored))
            async with topic.lock:
                if self.topics.get(subject) is not topic:
                    continue  # removed while we waited for its lock: start over
                if topic.stored != view.stored:
                    raise ValueError(f"{view} cannot watch {subject}: stored and core differ")
                topic.watchers.setdefault(view, set()).add(outbox)
                if topic.subscription is None:
                    try:
                        if topic.stored:
                            target, receive = live_subject(subject), self._receiver(topic)
                        else:
                            target, receive = subject, self._audio_receiver(topic)
                        topic.subscription = await self.client.subscribe(target, cb=receive)
                        # nats-py writes a flush's PING straight to the socket, ahead of the
                        # commands its flusher task has yet to send: let that task send the SUB
                        # first, or the PONG does not prove the server has it (it lost about
                        # one subscription's first message in a thousand).
                        await asyncio.sleep(0)
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
            headers = msg.headers or {}
            try:
                stream, seq = headers["Nats-Stream"], int(headers["Nats-Sequence"])
                previous = int(headers.get("Nats-Last-Sequence", "0"))
            except (KeyError, ValueError):
                self._reject("not republished by a stream (no sequence)", "not_stored")
                return
            if stream not in PREFIXES:
                self._reject(f"republished by an unknown stream {stream!r}", "not_stored")
                return
            async with topic.delivering:
                # Core NATS is at most once: a message this subscription never got (a reconnect,
                # a slow consumer) shows as a jump in the subject's previous sequence. Stored
                # messages are read back, so a connected client misses nothing durable.
                single = "*" not in topic.subject
                jumped = single and topic.stream == stream and topic.last_seq < previous < seq
                if jumped and not await self._catch_up(topic, until=seq - 1):
                    # What was missed cannot be read now: say so to every client, with the
                    # cursor it got last, from which a reconnect recovers it.
                    self._missed(topic)
                subject = msg.subject.removeprefix(LIVE_PREFIX)
                self._deliver(topic, subject, stream, seq, message)

        return receive

    def _deliver(
        self, topic: Topic, subject: str, stream: str, seq: int, message: dict[str, Any]
    ) -> None:
        """Offers one stored message to every watcher, once: a sequence already delivered (a
        catch-up overlapping the live feed) is skipped."""
        if topic.stream == stream and seq <= topic.last_seq:
            return
        topic.stream, topic.last_seq = stream, seq
        # The subject is the authority (SPEC 7): an envelope naming another workspace, call
        # or conversation never reaches a client. Turns carry no workspace to compare.
        if topic.envelopes:
            mismatch = subject_mismatch(subject, message)
        elif "workspace_id" in message and message["workspace_id"] != topic.workspace_id:
            mismatch = "workspace_id differs from the subject's"
        else:
            mismatch = None
        if mismatch is not None:
            self._reject(mismatch, "subject_mismatch")
            return
        event_type = str(message.get("event_type"))
        now = asyncio.get_running_loop().time()
        # No await below: the watcher sets cannot change while we walk them, so no copies.
        for view, outboxes in topic.watchers.items():
            if not outboxes:
                continue
            cursor = cursor_of(view, message, stream, seq)
            for item in encode(view, message, cursor):
                if isinstance(item, Terminal):
                    for outbox in outboxes:
                        outbox.end(item)
                    continue
                for outbox in outboxes:
                    if outbox.wants is None or outbox.wants(event_type):
                        outbox.offer(item, seq, cursor, now)

    def _missed(self, topic: Topic) -> None:
        """Every watcher of the topic owes its client a gap notice (at least one frame)."""
        self.caught_up_failed[topic.stream or "unknown"] += 1
        for view, outboxes in topic.watchers.items():
            if view.stored:
                for outbox in outboxes:
                    outbox.missed(1)

    async def _catch_up(self, topic: Topic, until: int | None = None) -> bool:
        """Delivers what the topic's stream stored after the last message delivered (up to
        `until`); the caller holds `topic.delivering`. False when the history could not be read
        (the bus is slow or down)."""
        if topic.stream is None:
            return True  # nothing delivered yet: no position to read on from
        try:
            async for stored in stored_after(
                self.client, topic.stream, topic.subject, topic.last_seq, until=until
            ):
                try:
                    message = orjson.loads(stored.data)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(message, dict):
                    self.caught_up[topic.stream] += 1
                    self._deliver(topic, stored.subject, topic.stream, stored.seq, message)
        except BusUnavailable as failure:
            log.warning("live streams could not catch up: %s", failure)
            return False
        return True

    async def catch_up(self) -> None:
        """After the bus connection came back: every topic reads what was stored while it
        was away, so its clients get it live (a missed `call.completed` still ends a call)."""
        for topic in list(self.topics.values()):
            if topic.stored and topic.subscription is not None:
                async with topic.delivering:
                    if not await self._catch_up(topic):
                        self._missed(topic)

    def _audio_receiver(self, topic: Topic) -> Callable[[Msg], Any]:
        """A call's audio: only whole 20 ms chunks pass (SPEC 5.3), wrapped once and offered to
        every listener. The subscription's subject was built from the listener's principal and
        the call in its path; there is nothing in raw PCM to trust or distrust."""

        async def receive(msg: Msg) -> None:
            self.metrics.bus_messages += 1
            if len(msg.data) != CHUNK_BYTES:
                self._reject(
                    f"an audio chunk of {len(msg.data)} bytes, not {CHUNK_BYTES}", "audio_size"
                )
                return
            if self.lag.lagging:
                self.shed["loop_late"] += 1
                return
            chunk = AudioChunk(msg.data)
            for outbox in topic.watchers.get(View.AUDIO, ()):
                outbox.offer_audio(chunk)

        return receive

    def _reject(self, why: str, reason: str) -> None:
        """Counted always; logged at most once a minute (a producer could fill the log)."""
        self.rejected[reason] += 1
        now = time.monotonic()
        if now - self._last_reject_log >= REJECT_LOG_EVERY:
            self._last_reject_log = now
            log.warning(
                "dropped a message for live streams: %s (counted in %s)", why, REJECTED_METRIC
            )
