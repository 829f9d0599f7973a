"""A call's live audio as the call WebSocket carries it (SPEC 5.3, "Listening"): the chunk
format, and the per-listener buffer that is bounded in time and loses its oldest audio, never
an event, when a listener falls behind. Pure: no I/O."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

SAMPLE_RATE = 16_000  # Hz, mono, signed 16-bit little-endian
CHUNK_MS = 20
CHUNK_BYTES = SAMPLE_RATE * CHUNK_MS // 1000 * 2  # 640: one bus message, one binary frame
BUFFER_CHUNKS = 1000 // CHUNK_MS  # 50: a listener more than a second behind loses the oldest


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """One 20 ms chunk, wrapped once by the hub and shared by every listener of the call (the
    wrapper tells the writer it is a binary frame, not an event)."""

    pcm: bytes


class AudioBuffer:
    """The audio waiting for one listener. Separate from the outbox's event frames, so audio
    never takes an event's place and an event never waits behind audio. Full, it drops the
    oldest chunk: a listener hears the present, late, rather than the past, later and later."""

    def __init__(
        self, capacity: int = BUFFER_CHUNKS, on_drop: Callable[[], None] = lambda: None
    ) -> None:
        self.capacity = capacity
        self.dropped = 0
        self._chunks: deque[AudioChunk] = deque()
        self._on_drop = on_drop

    def __len__(self) -> int:
        return len(self._chunks)

    def push(self, chunk: AudioChunk) -> None:
        if len(self._chunks) >= self.capacity:
            self._chunks.popleft()
            self.dropped += 1
            self._on_drop()
        self._chunks.append(chunk)

    def pop(self) -> AudioChunk | None:
        return self._chunks.popleft() if self._chunks else None

    def clear(self) -> None:
        self._chunks.clear()
