"""The retry schedule, pure: when the next attempt is due after a failure, or None when the
delivery has had its 24 hours. Written down in docs/webhooks.md; the tests drive it with an
injected clock."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

WINDOW = timedelta(hours=24)
# Delay after the n-th failed attempt (n = 1, 2, ...); the last repeats until the window ends.
DELAYS = (
    timedelta(seconds=5),
    timedelta(seconds=30),
    timedelta(minutes=2),
    timedelta(minutes=10),
    timedelta(minutes=30),
    timedelta(hours=1),
    timedelta(hours=2),
    timedelta(hours=4),
    timedelta(hours=8),
)
JITTER = 0.1  # ±10 %, so endpoints that failed together do not retry together
MAX_RETRY_AFTER = timedelta(hours=8)


def next_attempt(
    first_attempt_at: datetime,
    failed_attempts: int,
    now: datetime,
    *,
    retry_after: timedelta | None = None,
    rng: random.Random | None = None,
) -> datetime | None:
    """When to try again after `failed_attempts` failures (the latest at `now`), or None once
    24 hours from the first attempt have passed. A final attempt is always made at the end of
    the window if the schedule would skip past it."""
    deadline = first_attempt_at + WINDOW
    if now >= deadline:
        return None
    delay = DELAYS[min(failed_attempts, len(DELAYS)) - 1]
    spread = (rng or random).uniform(-JITTER, JITTER)
    delay = delay * (1 + spread)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return min(now + delay, deadline)
