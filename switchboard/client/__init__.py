"""A Python client for Switchboard's live streams: async iterators that skip heartbeats, end on
`event: end`, 204 or close 1000, raise on terminal errors, reconnect with backoff and jitter
where SPEC allows it (drain, dropped connections, silence past the heartbeat timeout), and a
call socket that sends DTMF and awaits its result, and listens to the call's live audio
(`sb.listen(call_id)` or `call.listen()`: 20 ms chunks of 16 kHz mono 16-bit PCM).

Every stream keeps the cursor of the last frame it received and resumes from it on every
reconnect (SPEC 5.4), on the same server or the next of several base URLs, so a reconnect loses
no durable frame; a `gap` reconnects at once to get dropped frames back, and a `reset` (the
server did not know the cursor) is reported through `on_reset` and `stream.position.resets`.

    async with SwitchboardClient(["http://a:8080", "http://b:8080"], api_key) as sb:
        async for turn in sb.transcript(call_id, from_start=True):
            print(turn["role"], turn["text"], "(final)" if turn["is_final"] else "")
"""

from switchboard.client.environment import script_arguments, server_urls
from switchboard.client.resume import Position
from switchboard.client.streams import (
    CallSocket,
    SseStream,
    StreamClosed,
    StreamError,
    SwitchboardClient,
)

__all__ = [
    "CallSocket",
    "Position",
    "SseStream",
    "StreamClosed",
    "StreamError",
    "SwitchboardClient",
    "script_arguments",
    "server_urls",
]
