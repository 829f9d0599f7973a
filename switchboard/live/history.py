"""A call's events as JetStream stored them: how a stream learns that a call exists or has
ended before the recorder has written it to the database (the bus is the record of what
happened; the database follows it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from nats.aio.client import Client

from switchboard.bus.stored import last_message, stored_after
from switchboard.events import EVENTS_STREAM, call_events_subject

MAX_EVENTS = 1000  # read back per call; a call has far fewer
# Events a media plane may store after `call.completed` (SPEC 4: `call.quality` comes "once, at
# call end", in either order); when one is last, the completion may be just before it.
AFTER_THE_END = frozenset({"call.quality"})


async def call_history(
    client: Client, workspace_id: str, call_id: str, limit: int = MAX_EVENTS
) -> AsyncIterator[dict[str, Any]]:
    """The call's stored envelopes, oldest first, at most `limit`. Envelopes that name another
    workspace than their subject are skipped, as the hub skips them live. A bus that does not
    answer raises BusUnavailable: whether to carry on without the rest is the caller's call."""
    count = 0
    async for stored in stored_after(
        client, EVENTS_STREAM, call_events_subject(workspace_id, call_id), 0
    ):
        try:
            envelope = orjson.loads(stored.data)
        except orjson.JSONDecodeError:
            continue
        if isinstance(envelope, dict) and envelope.get("workspace_id") == workspace_id:
            yield envelope
            count += 1
            if count >= limit:
                return


@dataclass(frozen=True)
class StoredCall:
    """What the bus holds of a call: whether any of its events is stored (it exists, even if the
    recorder has not written it yet) and whether its `call.completed` is."""

    initiated: bool
    completed: bool


async def stored_call(client: Client, workspace_id: str, call_id: str) -> StoredCall:
    """One read at rest: the last event stored on the call's subject says whether the call
    exists (any event of it is stored) and has ended (it is `call.completed`). Only when the
    last one is something else that comes at the end (`call.quality` after the completion) or
    names another workspace is the whole history read."""
    stored = await last_message(client, EVENTS_STREAM, call_events_subject(workspace_id, call_id))
    if stored is None:
        return StoredCall(False, False)
    try:
        last = orjson.loads(stored.data)
    except orjson.JSONDecodeError:
        last = None
    if isinstance(last, dict) and last.get("workspace_id") == workspace_id:
        if last.get("event_type") == "call.completed":
            return StoredCall(True, True)
        if last.get("event_type") not in AFTER_THE_END:
            return StoredCall(True, False)
    initiated = False
    async for envelope in call_history(client, workspace_id, call_id):
        initiated = True
        if envelope.get("event_type") == "call.completed":
            return StoredCall(True, True)
    return StoredCall(initiated, False)
