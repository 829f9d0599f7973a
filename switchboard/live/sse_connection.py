"""An SSE stream once it is live: its connection, owned by a small protocol object of ours
instead of the server's request cycle and an ASGI call (issue 13, memory per stream).

Until the stream is live (authentication, the checks, the response head, a replay) it is an
ordinary ASGI request. Then `take_over` moves the connection to an `SseConnection`, the ASGI
call returns, and everything it held is freed: its task and the frames of every middleware
layer, uvicorn's protocol, request cycle, parser and flow control, the scope and its headers.
What stays per stream is the transport, this object and the outbox.

There is no writer task either. A live frame is written straight into the socket by the hub
(`direct`) when nothing is queued before it and the client keeps up. Everything else (frames
that queued while the client was behind, heartbeats, gap notices, the terminal frame) is
written by `pump`, which the outbox calls when it has something and which runs again when the
socket's buffer drains. Behind means the transport's buffer is over BACKLOG_BYTES: the write
buffer limits are set to it, so the transport says so itself (`pause_writing`), and the
registry's ticker reads `writing_since` to cut off a client that stays behind for two
heartbeat intervals, as it did for a writer stuck in `send`.

After the terminal frame the connection is closed: no other request can follow on it, since the
server's parser is gone (the response head, sent before the take-over, could not say so)."""

from __future__ import annotations

import asyncio
from typing import Any

from switchboard.api.handoff import Handoff
from switchboard.live.connection import StreamConnection
from switchboard.live.direct import http_chunk
from switchboard.live.frames import SSE_HEARTBEAT, Terminal
from switchboard.live.outbox import Idle, Outbox

BATCH = 64  # frames joined into one write when a client has fallen behind
LAST_CHUNK = b"0\r\n\r\n"


class SseConnection(StreamConnection):
    __slots__ = ("chunked", "heartbeats")

    def __init__(
        self,
        transport: asyncio.Transport,
        outbox: Outbox,
        handoff: Handoff,
        *,
        kind: str,
        frames_sent: dict[str, int],
        heartbeats: dict[str, int],
    ) -> None:
        super().__init__(transport, outbox, handoff, kind=kind, frames_sent=frames_sent)
        self.chunked = True  # HTTP/1.1 (chunked body); HTTP/1.0 ends with the connection
        self.heartbeats = heartbeats

    # The outbox's side.

    def direct(self, frame: bytes | str) -> bool:
        """Writes a live frame at once, or says it cannot (the outbox queues it)."""
        if self.paused or self.done or not isinstance(frame, bytes):
            return False
        transport = self.transport
        if transport.is_closing():
            return False
        transport.write(http_chunk(frame) if self.chunked else frame)
        self.frames_sent[self.kind] += 1
        return True

    def pump(self) -> None:
        """Writes what the outbox holds, in order, until it is empty or the client is behind."""
        self.scheduled = False
        outbox = self.outbox
        parts: list[bytes] = []
        while not self.done and not self.paused:
            item = outbox.poll()
            if isinstance(item, Idle):
                break
            if outbox.aborted:
                self.finish()
                self.transport.abort()
                return
            if item is None:
                parts.append(SSE_HEARTBEAT)
                self.heartbeats[self.kind] += 1
            elif isinstance(item, Terminal):
                parts.append(item.sse())
                self._write(parts, last=True)
                self.transport.close()  # after what is buffered has been sent, if it is
                self.give_up_later()
                self.finish()
                return
            else:
                parts.append(item if isinstance(item, bytes) else item.encode())
                self.frames_sent[self.kind] += 1
            if len(parts) >= BATCH:
                self._write(parts)
                parts = []
        if parts:
            self._write(parts)

    def _write(self, parts: list[bytes], *, last: bool = False) -> None:
        body = b"".join(parts)
        if self.chunked:
            body = b"%x\r\n%s\r\n" % (len(body), body)
            if last:
                body += LAST_CHUNK
        self.transport.write(body)
        self.outbox.last_write = self.loop.time()

    def finish(self) -> None:
        """The stream is over: the outbox stops, and what the request held is released."""
        if self.done:
            return
        self.done = True
        outbox = self.outbox
        outbox.direct = None
        outbox.ready = None
        outbox.writing_since = None
        if outbox.terminal is None:
            outbox.abort()
        self.handoff.end()

    # The transport's side (asyncio.Protocol), beside StreamConnection's.

    def data_received(self, data: bytes) -> None:
        """A client says nothing on an SSE stream; whatever it sends is ignored, not kept."""

    def eof_received(self) -> bool | None:
        return None  # the client closed its side: the transport closes, the stream ends


def take_over(
    protocol: Any,
    outbox: Outbox,
    handoff: Handoff,
    *,
    kind: str,
    frames_sent: dict[str, int],
    heartbeats: dict[str, int],
) -> SseConnection:
    """Moves a live SSE response from the server's protocol (api/http_protocol.py) to an
    `SseConnection`."""
    transport: asyncio.Transport = protocol.transport
    connection = SseConnection(
        transport,
        outbox,
        handoff,
        kind=kind,
        frames_sent=frames_sent,
        heartbeats=heartbeats,
    )
    connection.chunked, connection.paused = protocol.hand_over(connection)
    connection.own()
    if connection.paused:
        outbox.writing_since = connection.loop.time()
    outbox.direct = connection.direct
    outbox.ready = connection.wake
    outbox.idle = True  # no writer waits, but a direct write overtakes nothing queued
    connection.wake()  # what queued while the stream was still an ASGI call
    return connection
