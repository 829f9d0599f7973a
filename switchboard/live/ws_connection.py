"""A call WebSocket once accepted: its connection, owned by a small protocol object of ours
instead of the server's WebSocket protocol and an ASGI call (issue 13, memory per stream; the
SSE streams do the same, see live/sse_connection.py).

The server answers the handshake; right after the accept, before the client may send a frame,
`take_over` moves the socket here, and the ASGI call returns once the replay is written. Freed
with it: the call's task and middleware frames, the server's protocol with its queue, events
and the `websockets` connection (request and response headers, parser, buffers). What stays is
the transport, this object, its frame reader, the command session and the outbox.

No task per socket either. Events are written by the hub straight into the socket when nothing
is queued and the client keeps up (`direct`); the rest by `pump`, called by the outbox and when
the socket's buffer drains. Commands are read as they arrive and acted on in order (a listen
or unlisten finishes before the next command is read); reading stops while the replies owed to
the client are at their bound, so a client that sends but does not read is held back by TCP.
The server's keep-alive is kept: a ping every heartbeat interval, closed 1011 if the pong does
not come within another."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

from switchboard.api.handoff import Handoff, in_background
from switchboard.live.audio import AudioChunk
from switchboard.live.connection import StreamConnection
from switchboard.live.direct import websocket_binary, websocket_text
from switchboard.live.frames import Ending, Terminal
from switchboard.live.outbox import Idle, Outbox
from switchboard.live.ws_session import COMMAND_TIMEOUT, HOLD, SKIP, CommandSession
from switchboard.live.ws_wire import (
    CLOSE,
    PING,
    PONG,
    TEXT,
    Control,
    FrameReader,
    WireFault,
    close_code,
    close_frame,
    frame,
)

log = logging.getLogger(__name__)

MAX_MESSAGE = 16 * 1024  # commands are tiny; a bigger message is closed with 1009
READ_LIMIT = 64 * 1024  # unread bytes held while commands wait, before reading pauses


class WebSocketConnection(StreamConnection):
    __slots__ = (
        "audio_bytes",
        "busy",
        "closing",
        "failed",
        "held",
        "ping_interval",
        "ping_payload",
        "ping_timer",
        "reader",
        "reading_paused",
        "room",
        "session",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        outbox: Outbox,
        handoff: Handoff,
        *,
        kind: str,
        ping_interval: float,
        frames_sent: dict[str, int],
        audio_bytes: dict[str, int],
    ) -> None:
        super().__init__(transport, outbox, handoff, kind=kind, frames_sent=frames_sent)
        self.ping_interval = ping_interval
        self.audio_bytes = audio_bytes
        self.reader = FrameReader(MAX_MESSAGE)
        self.session: CommandSession | None = None  # None while the replay is written
        self.reading_paused = False
        self.busy = False  # a listen or unlisten is under way: the next command waits
        self.closing = False  # our close frame is sent; the client's is awaited
        self.failed = False  # the client broke the protocol: its input is discarded
        # An event held until its command's result is queued: (text, request_id, deadline).
        self.held: tuple[str, str, float] | None = None
        self.room: asyncio.Future[None] | None = None  # what a replay waits on while paused
        self.ping_payload: bytes | None = None  # of the ping awaiting its pong
        self.ping_timer: asyncio.TimerHandle | None = None

    # The ASGI call's side, until it returns.

    async def send_text(self, text: str) -> None:
        """A replayed event, written once the client has room for it (raises ConnectionError
        when the client is gone)."""
        while self.paused and not self.done:
            self.room = self.loop.create_future()
            try:
                await self.room
            finally:
                self.room = None
        if self.done or self.transport.is_closing():
            raise ConnectionResetError("the client left during the replay")
        self.transport.write(frame(TEXT, text.encode()))

    def _make_room(self) -> None:
        room = self.room
        if room is not None and not room.done():
            room.set_result(None)

    def start(self, session: CommandSession) -> None:
        """The replay is written: commands are read, live events and audio flow."""
        self.session = session
        outbox = self.outbox
        outbox.direct = self.direct
        outbox.direct_audio = self.direct_audio
        outbox.ready = self.wake
        outbox.idle = True  # no writer waits, but a direct write overtakes nothing queued
        self._schedule_ping()
        self.wake()  # what queued during the replay
        self._read()  # commands that came during the replay

    def close(self, code: int, reason: str) -> None:
        """Ends the stream with a close frame; the socket closes when the client answers it."""
        if self.closing or self.done:
            return
        self.closing = True
        self.transport.write(close_frame(code, reason))
        # The client answers with its own close frame (then the socket closes), or not.
        self.give_up_later()
        self.finish()

    # The outbox's side.

    def direct(self, item: bytes | str) -> bool:
        session = self.session
        if (
            self.paused
            or self.closing
            or self.held is not None
            or session is None
            or session.held()
            or not isinstance(item, str)
            or self.transport.is_closing()
        ):
            return False
        self.transport.write(websocket_text(item))
        self.frames_sent[self.kind] += 1
        return True

    def direct_audio(self, chunk: AudioChunk) -> bool:
        if self.paused or self.closing or self.transport.is_closing():
            return False
        self.transport.write(websocket_binary(chunk))
        self.audio_bytes[self.kind] += len(chunk.pcm)
        return True

    def pump(self) -> None:
        """Writes what the outbox holds, in order, until it is empty, the client is behind, or
        an event waits for its command's result."""
        self.scheduled = False
        session = self.session
        if self.done or session is None:
            return
        outbox = self.outbox
        parts: list[bytes] = []
        while not self.paused:
            if self.held is not None:
                parts.extend(websocket_text(str(r)) for r in outbox.take_priority())
                waiting, request_id, deadline = self.held
                if request_id in session.answered and self.loop.time() < deadline:
                    break  # the result's arrival wakes the pump; so does the deadline
                self.held = None
                parts.append(websocket_text(waiting))
                self.frames_sent[self.kind] += 1
                continue
            item = outbox.poll(audio=True)
            if isinstance(item, Idle):
                break
            if outbox.aborted:
                self.transport.abort()
                self.finish()
                return
            if item is None:  # a heartbeat: the WebSocket's keep-alive is its pings
                continue
            if isinstance(item, AudioChunk):
                parts.append(websocket_binary(item))
                self.audio_bytes[self.kind] += len(item.pcm)
                continue
            if isinstance(item, Terminal):
                if parts:
                    self.transport.write(b"".join(parts))
                self.close(*item.websocket_close())
                return
            text = item if isinstance(item, str) else item.decode()
            verdict, awaited = session.before_send(text)
            if verdict == SKIP:
                continue
            if verdict == HOLD and awaited is not None:
                self.held = (text, awaited, self.loop.time() + COMMAND_TIMEOUT)
                self.loop.call_later(COMMAND_TIMEOUT, self.wake)
                continue
            parts.append(websocket_text(text))
            self.frames_sent[self.kind] += 1
        if parts:
            self.transport.write(b"".join(parts))
        if not outbox.replies_full:
            self._read()  # commands that waited for room for their replies

    # Reading.

    def _read(self) -> None:
        """Acts on what the client has sent, frame by frame, while commands may be read."""
        reader = self.reader
        while not self.done or self.closing:
            session = self.session
            waiting = session is None or self.busy or self.outbox.replies_full
            # Once our close frame is out, only the client's answer matters: read on.
            if waiting and not self.closing:
                if len(reader.buffer) > READ_LIMIT and not self.reading_paused:
                    self.reading_paused = True
                    self.transport.pause_reading()
                return
            try:
                event = reader.next()
            except WireFault as fault:
                self._fail(fault.code, fault.reason)
                return
            if event is None:
                break
            if isinstance(event, Control):
                self._control(event)
            elif session is not None and not self.closing and not self.done:
                if event.text is None:
                    self.outbox.end_now(Terminal(Ending.BINARY_FRAME))
                else:
                    self._command(session, event.text)
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def _command(self, session: CommandSession, text: str) -> None:
        pending = session.handle(text)
        if pending is not None:
            self.busy = True
            task = self.loop.create_task(pending)
            session.commands.add(task)
            task.add_done_callback(self._command_done)

    def _command_done(self, task: asyncio.Task[None]) -> None:
        if self.session is not None:
            self.session.commands.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a WebSocket command failed", exc_info=task.exception())
        self.busy = False
        self._read()

    def _control(self, control: Control) -> None:
        if control.opcode == PING:
            if not self.closing:
                self.transport.write(frame(PONG, control.payload))
        elif control.opcode == PONG:
            if control.payload == self.ping_payload:
                self.ping_payload = None
                self._schedule_ping()
        elif control.opcode == CLOSE:
            if not self.closing:
                try:
                    code = close_code(control.payload)
                except WireFault as fault:
                    self._fail(fault.code, fault.reason)
                    return
                self.closing = True
                self.transport.write(close_frame(code))  # the RFC's echo of the status
            self._close_transport()
            self.finish()

    def _fail(self, code: int, reason: str) -> None:
        """The client broke the protocol or stopped answering: close with the code that says
        how, and read nothing more of what it sends. The socket is half-closed and its input
        drained until the client closes it too: closing it with unread input would make the
        kernel answer with a reset, which can destroy the close frame before the client reads
        it (the rest of a message refused from its header is still arriving)."""
        if not self.closing:
            self.closing = True
            self.transport.write(close_frame(code, reason))
        self.failed = True
        self.reader.buffer.clear()
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.give_up_later()
        else:
            self._close_transport()
        self.finish()

    def _close_transport(self) -> None:
        """Closes the socket once what is buffered is sent; drops it if that does not happen
        soon (a client that reads nothing would hold it forever)."""
        self.transport.close()
        self.give_up_later()

    # Keep-alive.

    def _schedule_ping(self) -> None:
        if self.ping_interval > 0 and not self.done:
            self.ping_timer = self.loop.call_later(self.ping_interval, self._ping)

    def _ping(self) -> None:
        if self.done or self.closing:
            return
        if self.ping_payload is not None:  # the last ping went unanswered for an interval
            if self.paused:
                # It reads nothing (the ping is stuck behind what it has not read): the
                # registry's ticker cuts such a client off as stalled, a little later.
                self.ping_timer = self.loop.call_later(self.ping_interval, self._ping)
                return
            self._fail(1011, "keepalive ping timeout")
            return
        self.ping_payload = secrets.token_bytes(4)
        self.transport.write(frame(PING, self.ping_payload))
        self.ping_timer = self.loop.call_later(self.ping_interval, self._ping)

    # The end.

    def finish(self) -> None:
        """The stream is over: the outbox stops, commands in flight are dropped, and what the
        request held is released. The socket itself may live on until the close handshake."""
        if self.done:
            return
        self.done = True
        if self.ping_timer is not None:
            self.ping_timer.cancel()
        outbox = self.outbox
        outbox.direct = None
        outbox.direct_audio = None
        outbox.ready = None
        outbox.writing_since = None
        outbox.abort()
        self._make_room()  # a replay waiting for room finds the client gone
        session = self.session
        if session is not None:
            in_background(session.close())
        self.handoff.end()

    # The transport's side (asyncio.Protocol), beside StreamConnection's.

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return  # after a protocol error nothing the client sends can be read
        self.reader.feed(data)
        self._read()

    def eof_received(self) -> bool | None:
        return None  # the client closed its side without a close frame: the socket closes

    def resume_writing(self) -> None:
        self._make_room()  # a replay waiting for room
        super().resume_writing()


def take_over(
    protocol: Any,
    outbox: Outbox,
    handoff: Handoff,
    *,
    kind: str,
    ping_interval: float,
    frames_sent: dict[str, int],
    audio_bytes: dict[str, int],
) -> WebSocketConnection | None:
    """Moves an accepted WebSocket from the server's protocol (api/http_protocol.py) to a
    `WebSocketConnection`; None, and nothing changed, if the client has sent anything already
    (it may not before the handshake's answer): that socket stays with the server."""
    transport: asyncio.Transport = protocol.transport
    connection = WebSocketConnection(
        transport,
        outbox,
        handoff,
        kind=kind,
        ping_interval=ping_interval,
        frames_sent=frames_sent,
        audio_bytes=audio_bytes,
    )
    if not protocol.hand_over(connection):
        return None
    connection.own()
    return connection
