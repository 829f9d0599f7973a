"""A bounded, never-blocking queue of wire frames for one client, drained by its writer task.

The bus side calls `offer` and never waits: a full outbox drops the new frame and counts it.
Replies to the client's own commands and the terminal frame bypass the bound (they must not be
lost), so a stalled client can still be told why its stream ended; replies have a bound of their
own, which the WebSocket keeps by not reading the client's next command until there is room.

A call WebSocket that listens (SPEC 5.3) also has an audio buffer beside the frames: bounded in
time, losing its oldest chunk when full, and drained only when no event, reply or terminal is
waiting, so audio never delays an event and an event never waits for room behind audio."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal, overload

from switchboard.live.audio import AudioBuffer, AudioChunk
from switchboard.live.frames import Terminal

# SSE frames are bytes; WebSocket texts are str, decoded once for all watchers.
Frame = bytes | str
Item = Frame | Terminal
# How a stream kind says "N frames were dropped; resume from this cursor" (SPEC 5.4).
GapFrame = Callable[[int, str | None], Frame]


class Idle:
    """What `poll` returns when there is nothing to write."""

    __slots__ = ()


IDLE = Idle()  # the one instance


class Outbox:
    # Slots: thousands of outboxes live at once, and a dict of these attributes each would
    # cost more than the rest of the outbox.
    __slots__ = (
        "_frames",
        "_on_drop",
        "_priority",
        "_room",
        "_terminal",
        "_waiter",
        "aborted",
        "audio",
        "capacity",
        "direct",
        "direct_audio",
        "dropped",
        "gap",
        "heartbeat_due",
        "idle",
        "last_cursor",
        "last_write",
        "owed_gap",
        "ready",
        "skip_through",
        "wants",
        "writing_since",
    )

    def __init__(
        self,
        capacity: int,
        on_drop: Callable[[], None] = lambda: None,
        *,
        gap: GapFrame | None = None,
        wants: Callable[[str], bool] | None = None,
    ) -> None:
        self.capacity = capacity
        self.dropped = 0
        # (sequence, frame): the sequence is the frame's JetStream position, 0 for frames that
        # have none (a gap notice), so the writer can skip what a replay already sent.
        # Lists, not deques: at most `capacity` items, and an empty deque costs 600 bytes more
        # than an empty list, for each of thousands of idle streams.
        self._frames: list[tuple[int, Frame]] = []
        self.gap = gap
        self.owed_gap = 0  # frames dropped since the last one queued: a gap notice is owed
        self.last_cursor: str | None = None  # of the last frame queued (or replayed)
        self.skip_through = 0  # frames at or below this sequence were sent by a replay
        # The event types this client asked for (the workspace stream's filter); None: all.
        self.wants = wants
        self._priority: list[Frame] = []
        self._terminal: Terminal | None = None
        # What the writer waits on in `next`, made when it waits (an asyncio.Event holds a
        # deque of its own): set by whatever gives it something to do.
        self._waiter: asyncio.Future[None] | None = None
        self._on_drop = on_drop
        self.aborted = False
        # Loop time of the last write to the client, kept by its writer; the registry's ticker
        # reads it to decide when an idle SSE stream is owed a heartbeat.
        self.last_write = 0.0
        self.heartbeat_due = False
        # Loop time at which the writer's current `send` began; None between sends. The
        # server's send waits for the socket to drain, forever if the client reads nothing, so
        # the ticker reads this to find clients that have stopped accepting bytes.
        self.writing_since: float | None = None
        # What the command reader waits on while the replies owed are at the bound.
        self._room: asyncio.Future[None] | None = None
        # The audio waiting for this client while it listens; None while it does not.
        self.audio: AudioBuffer | None = None
        # Writes a frame straight to the client's socket, or says it cannot (live/direct.py);
        # set once the stream is live. Used only while the writer waits with nothing queued,
        # so a direct frame can never overtake one on the writer's path.
        self.direct: Callable[[Frame], bool] | None = None
        self.direct_audio: Callable[[AudioChunk], bool] | None = None  # the same, for audio
        self.idle = False  # the writer is waiting in `next` with nothing to write
        # Set instead of a writer task once a connection of ours owns the stream
        # (live/sse_connection.py): called when there is something to write.
        self.ready: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def terminal(self) -> Terminal | None:
        return self._terminal

    def _nothing_before(self) -> bool:
        """Whether a direct write now would overtake nothing: the writer waits, nothing queued."""
        return self.idle and not self._frames and not self._priority

    def offer(
        self, frame: Frame, seq: int = 0, cursor: str | None = None, now: float | None = None
    ) -> bool:
        """Queues a frame unless the outbox is full, ended or aborted; never blocks. The first
        frame queued after drops is preceded by a gap notice naming the last cursor queued
        before them, so the client knows and can resume from there. `now`: the loop's time, if
        the caller has it (the hub reads it once per message, not once per client)."""
        if self._terminal is not None or self.aborted:
            return False
        direct = self.direct
        if direct is not None and self._nothing_before() and not self.owed_gap:
            if 0 < seq <= self.skip_through:
                return True  # the replay sent it
            if direct(frame):
                if cursor is not None:
                    self.last_cursor = cursor
                self.last_write = asyncio.get_running_loop().time() if now is None else now
                return True
        if len(self._frames) >= self.capacity:
            self.dropped += 1
            self.owed_gap += 1
            self._on_drop()
            return False
        if self.owed_gap and self.gap is not None:
            # May exceed the bound by one: the notice must not be lost to the same full buffer.
            self._frames.append((0, self.gap(self.owed_gap, self.last_cursor)))
        self.owed_gap = 0
        self._frames.append((seq, frame))
        if cursor is not None:
            self.last_cursor = cursor
        self._wake()
        return True

    def missed(self, count: int) -> None:
        """Frames this client should have had were lost upstream (the hub could not read them
        back): it is owed a gap notice, sent before the next frame or at once if none comes."""
        if self._terminal is not None or self.aborted:
            return
        self.owed_gap += count
        self._wake()

    def listen(self, buffer: AudioBuffer) -> None:
        """Starts accepting audio (a second listen keeps the buffer it has)."""
        if self.audio is None and not self.aborted:
            self.audio = buffer

    def unlisten(self) -> None:
        """Stops accepting audio and forgets what waits: nothing reaches the client after this."""
        self.audio = None

    def offer_audio(self, chunk: AudioChunk) -> bool:
        """Queues a chunk for a listening client; never blocks. A full buffer loses its oldest
        chunk (counted by the buffer), never this one; after the end nothing is queued."""
        if self.audio is None or self._terminal is not None or self.aborted:
            return False
        direct = self.direct_audio
        if direct is not None and self._nothing_before() and not self.audio and direct(chunk):
            return True
        self.audio.push(chunk)
        self._wake()
        return True

    def discard_for_replay(self) -> bool:
        """During a replay, live frames wait here; if any were dropped, the replay must read on
        past them: forget what waits (the replay will send it) and say so."""
        if not self.owed_gap:
            return False
        self._frames.clear()
        self.owed_gap = 0
        return True

    def _skip_replayed(self) -> None:
        while self._frames and 0 < self._frames[0][0] <= self.skip_through:
            self._frames.pop(0)

    def request_heartbeat(self) -> None:
        self.heartbeat_due = True
        self._wake()

    def push_priority(self, frame: Frame) -> None:
        """A reply to this client's own command: ahead of the stream, outside the frame bound.
        Replies have their own bound, kept by the reader (see `reply_room`)."""
        self._priority.append(frame)
        self._wake()

    @property
    def replies_full(self) -> bool:
        """Whether the replies owed are at their bound: read no more commands until they are
        sent (see `reply_room`)."""
        return len(self._priority) >= self.capacity

    async def reply_room(self) -> None:
        """Returns once fewer than `capacity` replies are queued, or the outbox was aborted. A
        client that sends commands but reads nothing is then held back by TCP (its commands
        stay unread) instead of growing the replies owed to it."""
        while len(self._priority) >= self.capacity and not self.aborted:
            self._room = asyncio.get_running_loop().create_future()
            try:
                await self._room
            finally:
                self._room = None

    def _replies_taken(self) -> None:
        if len(self._priority) < self.capacity:
            self._free_room()

    def _free_room(self) -> None:
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
        elif self.ready is not None:
            self.ready()

    def end(self, terminal: Terminal) -> None:
        """Ends the stream after what is already queued; the first ending wins."""
        if self._terminal is None:
            self._terminal = terminal
            self._wake()

    def end_now(self, terminal: Terminal) -> None:
        """Ends the stream before anything still queued (revocation, drain)."""
        self._frames.clear()
        self._terminal = None
        self.end(terminal)

    def abort(self) -> None:
        """The client is gone: wake the writer so it stops and releases everything at once."""
        self.aborted = True
        self._frames.clear()
        self._priority.clear()
        self.audio = None
        self._wake()
        self._free_room()

    def take_priority(self) -> list[Frame]:
        replies = list(self._priority)
        self._priority.clear()
        self._replies_taken()
        return replies

    def take_ready(self, limit: int) -> list[Frame]:
        """Up to `limit` queued frames without waiting, so a writer can send them in one write."""
        batch: list[Frame] = []
        self._skip_replayed()
        while self._frames and len(batch) < limit:
            batch.append(self._frames.pop(0)[1])
            self._skip_replayed()
        return batch

    @overload
    def poll(self) -> Item | Idle | None: ...

    @overload
    def poll(self, *, audio: Literal[True]) -> Item | AudioChunk | Idle | None: ...

    def poll(self, *, audio: bool = False) -> Item | AudioChunk | Idle | None:
        """The next reply or frame, then the terminal, without waiting: None when a heartbeat is
        due or the outbox was aborted, IDLE when there is nothing to write.

        With `audio` (a writer that also sends audio), a chunk only when no reply, frame or
        terminal is waiting; at the end the terminal comes first and unsent audio is dropped."""
        if self.aborted:
            return None
        if self.heartbeat_due:
            self.heartbeat_due = False
            return None
        if self._priority:
            reply = self._priority.pop(0)
            self._replies_taken()
            return reply
        self._skip_replayed()
        if self._frames:
            return self._frames.pop(0)[1]
        if self.owed_gap and self.gap is not None:
            # Caught up after drops with nothing newer to precede: say so now, not only
            # before a next frame that may never come (the call may have gone quiet).
            notice = self.gap(self.owed_gap, self.last_cursor)
            self.owed_gap = 0
            return notice
        if self._terminal is not None:
            return self._terminal
        if audio and self.audio is not None:
            chunk = self.audio.pop()
            if chunk is not None:
                return chunk
        return IDLE

    @overload
    async def next(self) -> Item | None: ...

    @overload
    async def next(self, *, audio: Literal[True]) -> Item | AudioChunk | None: ...

    async def next(self, *, audio: bool = False) -> Item | AudioChunk | None:
        """`poll`, waiting while there is nothing to write. There is no timeout: the registry's
        ticker wakes idle writers."""
        while True:
            item = self.poll(audio=True) if audio else self.poll()
            if not isinstance(item, Idle):
                return item
            # Nothing to do: wait to be woken. Nothing can wake the writer between the checks
            # in `poll` and this (one thread), so no wake-up is lost.
            self._waiter = asyncio.get_running_loop().create_future()
            self.idle = True
            try:
                await self._waiter
            finally:
                self.idle = False
                self._waiter = None
