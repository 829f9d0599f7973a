"""The token bucket that rate-limits the commands of one WebSocket: a pure object over a clock
reading, so its arithmetic is tested without sockets or sleeps."""

from __future__ import annotations

COMMANDS_PER_SECOND = 10.0
COMMAND_BURST = 20


class TokenBucket:
    """Holds up to `burst` tokens and gains `rate` a second; each message spends one, whatever
    it asks (send_dtmf, listen, unlisten, or something malformed). A burst of a keypad's worth
    of digits passes at once; a client that keeps sending faster than `rate` is refused the
    excess, one message at a time, never disconnected."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> bool:
        """Spends a token if there is one at time `now` (seconds, any monotonic clock)."""
        # A clock that went backwards adds nothing instead of draining the bucket.
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
