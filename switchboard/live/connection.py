"""What the streams' own connections share (live/sse_connection.py, live/ws_connection.py):
the transport they took over from the server, the outbox they write from, the request's
handoff they end, and the three rules of writing without a task: a pump runs once however
often the outbox calls, the transport's pause says when the client is behind (and starts the
clock of the registry's stall cut-off), and the last bytes of a stream that a client does not
take within LAST_BYTES_SECONDS are dropped with the connection."""

from __future__ import annotations

import asyncio

from switchboard.api.handoff import Handoff
from switchboard.live.direct import BACKLOG_BYTES, LAST_BYTES_SECONDS
from switchboard.live.outbox import Outbox


class StreamConnection(asyncio.Protocol):
    __slots__ = (
        "done",
        "frames_sent",
        "give_up",
        "handoff",
        "kind",
        "loop",
        "outbox",
        "paused",
        "scheduled",
        "transport",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        outbox: Outbox,
        handoff: Handoff,
        *,
        kind: str,
        frames_sent: dict[str, int],
    ) -> None:
        self.transport = transport
        self.outbox = outbox
        self.handoff = handoff
        self.kind = kind
        self.frames_sent = frames_sent
        self.paused = False  # the client is behind: the transport's buffer is over the limit
        self.scheduled = False  # a pump is due on the loop
        self.done = False  # the stream is over and what it held released
        self.give_up: asyncio.TimerHandle | None = None  # drops a client that takes no end
        self.loop = asyncio.get_running_loop()

    def own(self) -> None:
        """The server has handed the connection over: the request's releases now wait for
        this connection's end, and the transport pauses (`pause_writing`) as soon as the client
        is BACKLOG_BYTES behind, which is how a connection learns it."""
        self.handoff.take()
        self.transport.set_write_buffer_limits(high=BACKLOG_BYTES, low=BACKLOG_BYTES // 4)

    def pump(self) -> None:
        """Writes what the outbox holds (each stream its own way)."""
        raise NotImplementedError

    def finish(self) -> None:
        """Ends the stream and releases what it held (each stream its own way)."""
        raise NotImplementedError

    def wake(self) -> None:
        """The outbox has something to write: pump soon (once, however many wake it)."""
        if not self.scheduled and not self.done:
            self.scheduled = True
            self.loop.call_soon(self.pump)

    def give_up_later(self) -> None:
        """Drops the connection if it is still open after LAST_BYTES_SECONDS."""
        if self.give_up is not None:
            self.give_up.cancel()
        self.give_up = self.loop.call_later(LAST_BYTES_SECONDS, self.transport.abort)

    # The transport's side (asyncio.Protocol).

    def connection_lost(self, exc: Exception | None) -> None:
        if self.give_up is not None:
            self.give_up.cancel()
        self.finish()

    def pause_writing(self) -> None:
        self.paused = True
        self.outbox.writing_since = self.loop.time()

    def resume_writing(self) -> None:
        self.paused = False
        self.outbox.writing_since = None
        self.pump()
