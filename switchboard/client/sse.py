"""A small SSE parser over an httpx response: events as SPEC 5 frames them, comments included
(the client uses them as proof of life; tests check heartbeats with them)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx


@dataclass
class SseEvent:
    id: str | None = None
    event: str | None = None
    data: str | None = None
    retry: int | None = None
    comment: str | None = None


async def sse_events(response: httpx.Response) -> AsyncIterator[SseEvent]:
    current = SseEvent()
    async for line in response.aiter_lines():
        if line == "":
            if current != SseEvent():
                yield current
            current = SseEvent()
        elif line.startswith(":"):
            yield SseEvent(comment=line[1:].strip())
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                current.data = value if current.data is None else current.data + "\n" + value
            elif name == "id":
                current.id = value
            elif name == "event":
                current.event = value
            elif name == "retry" and value.isascii() and value.isdigit():
                current.retry = int(value)  # anything else is ignored, as EventSource does
    if current != SseEvent():
        yield current
