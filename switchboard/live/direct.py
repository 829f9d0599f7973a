"""Direct writes (issue 13): a live frame goes from the hub straight into a client's socket,
with no task switch, when nothing is queued for that client and its writer is idle.

Before, every frame woke one writer task per stream, which walked the ASGI `send` chain and the
server's framing to reach the same `transport.write`: at 100 streams a call that was most of
the CPU per frame, and a burst of messages queued thousands of task steps behind each other.
Now the hub's one pass over a topic's watchers writes each frame where it can; only a client
that is behind (bytes still waiting in its socket buffer), a stream still replaying, or a
stream with something else queued takes the old path through its outbox and writer, so order,
the 64-frame bound, gap notices and the stall cut-off all work as before.

The frame is framed here as the server would have: an HTTP/1.1 chunk for SSE (uvicorn sends a
stream without a length chunked; the SSE stream's own connection, live/sse_connection.py, writes
it), a text frame for the WebSocket (unmasked, never fragmented, no compression: the server
negotiates none). Each framing is made once per frame, not once per
client: the hub offers the same object to every watcher in a row."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from websockets.protocol import State

from switchboard.live.audio import AudioChunk
from switchboard.live.outbox import Frame

# A client whose socket buffer holds more than this is behind: its frames queue in its outbox
# (bounded, dropping) instead of piling up in the transport.
BACKLOG_BYTES = 16 * 1024


class _LastFraming:
    """A one-entry cache: the framing of the frame most recently framed."""

    __slots__ = ("frame", "wire")

    def __init__(self) -> None:
        self.frame: object = None
        self.wire = b""


_chunk_cache = _LastFraming()
_text_cache = _LastFraming()
_binary_cache = _LastFraming()


def http_chunk(frame: bytes) -> bytes:
    if frame is not _chunk_cache.frame:
        _chunk_cache.frame, _chunk_cache.wire = frame, b"%x\r\n%s\r\n" % (len(frame), frame)
    return _chunk_cache.wire


def _websocket_frame(opcode: int, payload: bytes) -> bytes:
    """A server-to-client frame (RFC 6455 5.2: FIN, the opcode, no mask)."""
    size = len(payload)
    first = 0x80 | opcode
    if size < 126:
        head = bytes((first, size))
    elif size < 1 << 16:
        head = bytes((first, 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((first, 127)) + size.to_bytes(8, "big")
    return head + payload


def websocket_text(frame: str) -> bytes:
    if frame is not _text_cache.frame:
        _text_cache.frame, _text_cache.wire = frame, _websocket_frame(0x1, frame.encode())
    return _text_cache.wire


def websocket_binary(chunk: AudioChunk) -> bytes:
    """An audio chunk's binary frame, made once for every listener (the hub wraps each chunk
    once and offers the same object to all)."""
    if chunk is not _binary_cache.frame:
        _binary_cache.frame, _binary_cache.wire = chunk, _websocket_frame(0x2, chunk.pcm)
    return _binary_cache.wire


class WebSocketDirect:
    """Writes text frames (events) and binary frames (audio) into an open connection of
    uvicorn's sans-I/O WebSocket protocol. `held` says when the writer must see every event
    itself (a DTMF result it is ordering, the live copies of a replay it is skipping)."""

    __slots__ = ("audio_bytes", "counter", "held", "kind", "protocol", "transport")

    def __init__(
        self,
        protocol: Any,
        counter: dict[str, int],
        kind: str,
        held: Callable[[], bool],
        audio_bytes: dict[str, int],
    ) -> None:
        self.protocol = protocol
        self.transport: asyncio.WriteTransport = protocol.transport
        self.counter = counter
        self.kind = kind
        self.held = held
        self.audio_bytes = audio_bytes

    def _open(self) -> bool:
        protocol = self.protocol
        transport = self.transport
        return not (
            protocol.close_sent
            or protocol.disconnected
            or protocol.conn.state is not State.OPEN
            or not protocol.writable.is_set()
            or transport.is_closing()
            or transport.get_write_buffer_size() > BACKLOG_BYTES
        )

    def __call__(self, frame: Frame) -> bool:
        if not isinstance(frame, str) or self.held() or not self._open():
            return False
        self.transport.write(websocket_text(frame))
        self.counter[self.kind] += 1
        return True

    def audio(self, chunk: AudioChunk) -> bool:
        if not self._open():
            return False
        self.transport.write(websocket_binary(chunk))
        self.audio_bytes[self.kind] += len(chunk.pcm)
        return True
