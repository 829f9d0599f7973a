"""What the three stream endpoints share: their services, their kind for metrics, the drop
counter of their outboxes, the check of the id in their path, and the means to notice and cut
off a client that has stopped reading."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from functools import partial
from typing import Any

from starlette.types import Message, Scope, Send

from switchboard.api.deps import Services
from switchboard.api.handoff import handoff_of, in_background
from switchboard.api.http_protocol import CONNECTION_EXTENSION
from switchboard.api.responses import send_error
from switchboard.batched_reads import BatchedReads
from switchboard.errors import ApiError
from switchboard.ids import is_id
from switchboard.live.hub import Hub, View
from switchboard.live.lookups import keep_call_status, keep_existence
from switchboard.live.outbox import Frame, GapFrame, Outbox
from switchboard.outage import BusUnavailable
from switchboard.shared_lookups import SharedLookups


async def _unwatch(hub: Hub, watches: list[tuple[str, View]], outbox: Outbox) -> None:
    for subject, view in watches:
        await hub.unwatch(subject, view, outbox)


def _unwatch_later(hub: Hub, watches: list[tuple[str, View]], outbox: Outbox) -> None:
    in_background(_unwatch(hub, watches, outbox))


class StreamEndpoint:
    kind = ""

    def __init__(self, services: Services) -> None:
        self.services = services
        metrics = services.metrics
        database = services.database
        # What opens ask the database: asked once for the opens that ask at once (a reconnect
        # storm), remembered while the answer holds (live/lookups.py), and the questions about
        # one workspace's calls read together (batched_reads.py).
        calls = BatchedReads[str, str, str | None](database.call_statuses, None)
        conversations = BatchedReads[str, str, bool](database.existing_conversations, False)
        self.call_statuses: SharedLookups[tuple[str, str], str | None] = SharedLookups(
            lambda key: calls.read(*key), keep_call_status, time.monotonic
        )
        self.conversations: SharedLookups[tuple[str, str], bool] = SharedLookups(
            lambda key: conversations.read(*key), keep_existence, time.monotonic
        )
        self.resumes = metrics.counter(
            "switchboard_stream_resumes_total",
            "Streams opened with a cursor or from=start.",
            "kind",
        )
        self.replayed = metrics.counter(
            "switchboard_frames_replayed_total", "Stored frames sent by resumes.", "kind"
        )
        self.gaps = metrics.counter(
            "switchboard_stream_gaps_total", "Gap notices sent after dropped frames.", "kind"
        )
        self.resets = metrics.counter(
            "switchboard_stream_resets_total",
            "Cursors that were unknown or expired (a reset was sent).",
            "kind",
        )
        # What every outbox of this endpoint calls, made once here rather than per stream: a
        # stream holds its callbacks for its life, and each is an object the collector walks.
        self._on_drop = self.dropped
        self._counted_gaps: dict[GapFrame, GapFrame] = {}

    @property
    def history(self) -> timedelta:
        return timedelta(hours=self.services.settings.history_hours)

    def dropped(self) -> None:
        self.services.metrics.frames_dropped[self.kind] += 1

    def new_outbox(
        self, gap: GapFrame | None = None, wants: Callable[[str], bool] | None = None
    ) -> Outbox:
        counted = None if gap is None else self._counted(gap)
        return Outbox(self.services.settings.stream_buffer, self._on_drop, gap=counted, wants=wants)

    def _counted(self, gap: GapFrame) -> GapFrame:
        """`gap`, counting each notice it makes in `switchboard_stream_gaps_total`."""
        counted = self._counted_gaps.get(gap)
        if counted is None:

            def counted(dropped: int, resume_from: str | None) -> Frame:
                self.gaps[self.kind] += 1
                return gap(dropped, resume_from)

            self._counted_gaps[gap] = counted
        return counted

    @asynccontextmanager
    async def watching(
        self, scope: Scope, workspace_id: str, watches: list[tuple[str, View]], outbox: Outbox
    ) -> AsyncIterator[None]:
        """Subscribes the outbox (before the caller reads any state, so nothing that happens
        in between is missed) and always unsubscribes it, however the stream ends: when the
        request returns, or, for a stream whose connection was taken over (api/handoff.py),
        when that connection ends."""
        hub = self.services.hub
        if not self.services.bus.connected:
            # Fail at once (503): a subscription now would wait for its flush to time out.
            raise BusUnavailable("the bus is not connected")

        try:
            for subject, view in watches:
                await hub.watch(subject, workspace_id, view, outbox)
            yield
        finally:
            handoff = handoff_of(scope)
            if handoff.taken:
                # A partial, not a closure: a stream holds this for its life, and a closure's
                # function and cells are several more objects for the collector to walk.
                handoff.release(partial(_unwatch_later, hub, watches, outbox))
            else:
                await _unwatch(hub, watches, outbox)

    async def path_id(self, scope: Scope, send: Send, name: str, prefix: str) -> str | None:
        """The well-formed id in the path, or None after answering 400. The check also keeps
        NATS wildcards (`*`, `>`) and dots out of the subjects built from the id."""
        value = str(scope["path_params"][name])
        if is_id(value, prefix):
            return value
        message = f"{name}: must be an id of the form {prefix}_..."
        await send_error(scope, send, ApiError("INVALID_ARGUMENT", message))
        return None


def timed_send(send: Send, outbox: Outbox) -> Send:
    """The stream's `send`, noting in the outbox when a write began and whether it is still
    waiting: the server's send waits for the socket to drain, which never happens when the
    client has stopped reading, so only the registry's ticker, outside, can notice."""
    clock = asyncio.get_running_loop().time

    async def send_timed(message: Message) -> None:
        outbox.writing_since = clock()
        try:
            await send(message)
        finally:
            outbox.writing_since = None
            outbox.last_write = clock()

    return send_timed


def hang_up_of_this_connection(scope: Scope) -> Callable[[], object]:
    """How to drop the current request's connection at once, from outside its writer.

    ASGI has no message for it: a close or a final body is queued behind the bytes the client
    is not reading, and a graceful close waits for them too. Our uvicorn protocols
    (`api.http_protocol`) put the transport's `abort` in the scope's extensions: its buffers
    are discarded, the socket is closed, and the pending `send` returns. Under another server
    the stream's task is cancelled instead, which frees everything of ours but leaves the
    socket to the server."""
    abort = scope.get("extensions", {}).get(CONNECTION_EXTENSION, {}).get("abort")
    if callable(abort):
        return abort  # type: ignore[no-any-return]
    task = asyncio.current_task()
    assert task is not None  # called from the stream's own task
    return task.cancel


def protocol_of_this_connection(scope: Scope) -> Any | None:
    """The server protocol object of the current request (our uvicorn protocols put it in the
    scope's extensions), for direct writes; None under another server."""
    return scope.get("extensions", {}).get(CONNECTION_EXTENSION, {}).get("protocol")
