"""A call's events as JetStream stored them, read back in order: what a new WebSocket replays,
and how a stream learns that a call exists or has ended before the recorder has written it to
the database (the bus is the record of what happened; the database follows it)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import nats.errors
import orjson
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from switchboard.events import EVENTS_STREAM, call_events_subject
from switchboard.outage import BusUnavailable

MAX_EVENTS = 1000  # read back per call; a call has far fewer
# Events a media plane may store after `call.completed` (SPEC 4: `call.quality` comes "once, at
# call end", in either order); when one is last, the completion may be just before it.
AFTER_THE_END = frozenset({"call.quality"})


async def call_history(
    js: JetStreamContext, workspace_id: str, call_id: str, limit: int = MAX_EVENTS
) -> AsyncGenerator[dict[str, Any], None]:
    """The call's stored envelopes, oldest first, at most `limit`. Envelopes that name another
    workspace than their subject are skipped, as the hub skips them live. A bus that does not
    answer raises BusUnavailable: whether to carry on without the rest is the caller's call."""
    subject = call_events_subject(workspace_id, call_id)
    seq = 0
    count = 0
    while count < limit:
        try:
            raw = await js.get_msg(EVENTS_STREAM, seq=seq + 1, subject=subject, next=True)
        except NotFoundError:
            return
        except (nats.errors.Error, OSError) as failure:  # no answer, timeout, connection lost
            raise BusUnavailable(
                f"could not read a call's events back: {type(failure).__name__}"
            ) from None
        seq = int(raw.seq or 0)
        try:
            envelope = orjson.loads(raw.data or b"")
        except orjson.JSONDecodeError:
            continue
        if isinstance(envelope, dict) and envelope.get("workspace_id") == workspace_id:
            count += 1
            yield envelope


@dataclass(frozen=True)
class StoredCall:
    """What the bus holds of a call: whether any of its events is stored (it exists, even if the
    recorder has not written it yet) and whether its `call.completed` is."""

    initiated: bool
    completed: bool


async def stored_call(js: JetStreamContext, workspace_id: str, call_id: str) -> StoredCall:
    """One read at rest: the last event stored on the call's subject says whether the call
    exists (any event of it is stored) and has ended (it is `call.completed`). Only when the
    last one is something else that comes at the end (`call.quality` after the completion) or
    names another workspace is the whole history read."""
    subject = call_events_subject(workspace_id, call_id)
    try:
        raw = await js.get_last_msg(EVENTS_STREAM, subject)
    except NotFoundError:
        return StoredCall(False, False)
    except (nats.errors.Error, OSError) as failure:
        raise BusUnavailable(
            f"could not read a call's last event: {type(failure).__name__}"
        ) from None
    try:
        last = orjson.loads(raw.data or b"")
    except orjson.JSONDecodeError:
        last = None
    if isinstance(last, dict) and last.get("workspace_id") == workspace_id:
        if last.get("event_type") == "call.completed":
            return StoredCall(True, True)
        if last.get("event_type") not in AFTER_THE_END:
            return StoredCall(True, False)
    initiated = completed = False
    history = call_history(js, workspace_id, call_id)
    async with contextlib.aclosing(history):
        async for envelope in history:
            kind = envelope.get("event_type")
            initiated = True
            completed = completed or kind == "call.completed"
            if completed:
                break
    return StoredCall(initiated, completed)
