"""What a stream's open asks the database (does the call exist here, has it ended; does the
conversation exist), shared by the opens that ask at once and remembered while the answer
cannot have changed in a way that matters.

A reconnect storm (a replica restarting, a load balancer moving 5,000 clients) asked the same
question once per stream: at 100 streams a call, 100 transactions for one row, and every pool
grown to its maximum. Now one read answers every open of the same call that arrives while it
is under way (switchboard/shared_lookups.py), and the answer is kept:

- an ended call's status and an existing conversation for good (neither changes back);
- `in_progress` for a second: a stream that opens on it still checks the bus for the call's
  end (the recorder may lag), so a call that ends meanwhile is never streamed as live;
- "not found" never: a call may be recorded a moment later.

Keys carry the workspace, so one workspace's answer never serves another's open."""

from __future__ import annotations

FOREVER = float("inf")
IN_PROGRESS_SECONDS = 1.0


def keep_call_status(status: str | None) -> float:
    if status is None:
        return 0.0
    return IN_PROGRESS_SECONDS if status == "in_progress" else FOREVER


def keep_existence(exists: bool) -> float:
    return FOREVER if exists else 0.0
