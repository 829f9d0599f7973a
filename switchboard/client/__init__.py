"""A Python client for Switchboard's live streams: async iterators that skip heartbeats, end on
`event: end`, 204 or close 1000, raise on terminal errors, reconnect with backoff and jitter
where SPEC allows it (drain, dropped connections, silence past the heartbeat timeout), and a
call socket that sends DTMF and awaits its result.

    async with SwitchboardClient("http://127.0.0.1:8080", api_key) as sb:
        async for turn in sb.transcript(call_id):
            print(turn["role"], turn["text"], "(final)" if turn["is_final"] else "")
"""

from switchboard.client.streams import StreamClosed, StreamError, SwitchboardClient

__all__ = ["StreamClosed", "StreamError", "SwitchboardClient"]
