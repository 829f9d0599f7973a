"""Direct writes (issue 13): a live frame goes from the hub straight into a client's socket,
with no task switch, when nothing is queued for that client and it keeps up.

Before, every frame woke one writer task per stream, which walked the ASGI `send` chain and the
server's framing to reach the same `transport.write`: at 100 streams a call that was most of
the CPU per frame, and a burst of messages queued thousands of task steps behind each other.
Now the hub's one pass over a topic's watchers writes each frame where it can (the streams' own
connections, live/sse_connection.py and live/ws_connection.py, decide whether they can); only
a client that is behind (bytes still waiting in its socket buffer), a stream still replaying,
or a stream with something else queued takes the path through its outbox, so order, the
64-frame bound, gap notices and the stall cut-off all work as before.

The framings live here: an HTTP/1.1 chunk for SSE (the response is chunked), a text or binary
frame for the WebSocket (unmasked, never fragmented, no compression: none is negotiated). Each
is made once per frame, not once per client: the hub offers the same object to every watcher
in a row."""

from __future__ import annotations

from switchboard.live.audio import AudioChunk
from switchboard.live.ws_wire import BINARY, TEXT
from switchboard.live.ws_wire import frame as websocket_frame

# A client whose socket buffer holds more than this is behind: its frames queue in its outbox
# (bounded, dropping) instead of piling up in the transport.
BACKLOG_BYTES = 16 * 1024
# Seconds a stream's last bytes (its terminal, a close frame) may wait on a client once the
# stream has ended: then the connection is dropped, as the ticker drops a stalled live stream.
LAST_BYTES_SECONDS = 5.0


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


def websocket_text(frame: str) -> bytes:
    if frame is not _text_cache.frame:
        _text_cache.frame, _text_cache.wire = frame, websocket_frame(TEXT, frame.encode())
    return _text_cache.wire


def websocket_binary(chunk: AudioChunk) -> bytes:
    """An audio chunk's binary frame, made once for every listener (the hub wraps each chunk
    once and offers the same object to all)."""
    if chunk is not _binary_cache.frame:
        _binary_cache.frame, _binary_cache.wire = chunk, websocket_frame(BINARY, chunk.pcm)
    return _binary_cache.wire
