"""Stopping background tasks for good."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection

# How often a cancellation that did not end a task is repeated.
RECANCEL_EVERY = 0.5


async def cancel_and_wait(tasks: Collection[asyncio.Task[None]]) -> None:
    """Cancels `tasks` and returns once every one has ended. A cancellation can be swallowed
    (Python 3.11's `wait_for` when it lands as the wait ends; nats-py's fetch, which waits out
    its timeout), so it is repeated until each task is done; a task's own stop flag should end
    its loop as well. A task's own failure is raised here."""
    for task in tasks:
        task.cancel()
    while pending := [task for task in tasks if not task.done()]:
        await asyncio.wait(pending, timeout=RECANCEL_EVERY)
        for task in pending:
            task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
