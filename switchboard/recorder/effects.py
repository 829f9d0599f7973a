"""What each event writes, as SQL run inside one workspace-scoped transaction. Every write is
idempotent on its own (ON CONFLICT) and the event is marked processed in the same transaction,
so a redelivery changes nothing. `apply` takes one event; `apply_batch` takes a fetched batch
of one workspace's events with a statement per batch where `apply` has one per event."""

from __future__ import annotations

from typing import Any

import orjson

from switchboard.bus import parking
from switchboard.bus.durable import NotYet, Unrecordable
from switchboard.db import Connection
from switchboard.db.scoped import savepoint
from switchboard.ids import parse_iso
from switchboard.outage import unavailable_dependency

RECORDER = "recorder"  # the consumer named on events the recorder parks

# How far a message has got; a status never moves backwards (a late `delivered` after `read`).
MESSAGE_PROGRESS = {"received": 1, "sent": 1, "delivered": 2, "read": 3, "failed": 4}


async def apply(conn: Connection, envelope: dict[str, Any]) -> bool:
    """Writes the event's effects; False if it had already been processed or has none."""
    await _require_workspace(conn, envelope["workspace_id"])
    if not has_effects(envelope):
        return False
    first = await conn.fetchval(
        """INSERT INTO processed_events (event_id, workspace_id, event_type) VALUES ($1, $2, $3)
           ON CONFLICT (event_id) DO NOTHING RETURNING true""",
        envelope["event_id"],
        envelope["workspace_id"],
        envelope["event_type"],
    )
    if not first:
        return False
    await _effects(conn, envelope)
    return True


async def apply_batch(conn: Connection, envelopes: list[dict[str, Any]]) -> int:
    """Writes the effects of one workspace's events, in order, with one statement marking them
    all processed and one per run of consecutive turns; returns how many were new. Raises on
    the first event that cannot be applied (NotYet included): the caller's transaction then
    undoes the whole batch, and the consumer applies it again one event at a time."""
    recorded = [envelope for envelope in envelopes if has_effects(envelope)]
    if not recorded:
        await _require_workspace(conn, envelopes[0]["workspace_id"])
        return 0
    # No workspace check here: processed_events' foreign key refuses the batch of a workspace
    # that does not exist, and `apply`, one event at a time, then says so.
    new = await conn.fetch(
        """INSERT INTO processed_events (event_id, workspace_id, event_type)
           SELECT event_id, $1::text, event_type FROM unnest($2::text[], $3::text[])
                  AS e (event_id, event_type)
           ON CONFLICT (event_id) DO NOTHING RETURNING event_id""",
        recorded[0]["workspace_id"],
        [e["event_id"] for e in recorded],
        [e["event_type"] for e in recorded],
    )
    fresh = first_seen(recorded, {row["event_id"] for row in new})
    for run in runs(fresh):
        if run[0]["event_type"] == "call.transcription":
            await _turns(conn, run)
        else:
            await _effects(conn, run[0])
    return len(fresh)


def has_effects(envelope: dict[str, Any]) -> bool:
    """Whether the recorder writes anything for the event. The others (silences, barge-ins,
    quality alerts, agent responses, DTMF) are for streams and webhooks only; they are not
    marked processed either: a redelivery of one has nothing to repeat, and marking them would
    grow processed_events by a row for each, for nothing."""
    event_type: str = envelope["event_type"]
    return event_type.startswith("message.") or event_type in _HANDLERS


def first_seen(envelopes: list[dict[str, Any]], new_ids: set[str]) -> list[dict[str, Any]]:
    """The envelopes whose event is new to the store, each once and in order: a batch can hold
    the same event twice (a producer that published it again), and only its first copy counts."""
    unseen = set(new_ids)
    fresh: list[dict[str, Any]] = []
    for envelope in envelopes:
        if envelope["event_id"] in unseen:
            unseen.discard(envelope["event_id"])
            fresh.append(envelope)
    return fresh


def runs(envelopes: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The envelopes in order, consecutive turns (`call.transcription`) together, every other
    event alone: a run of turns is one insert, and nothing moves past another event."""
    grouped: list[list[dict[str, Any]]] = []
    for envelope in envelopes:
        turn = envelope["event_type"] == "call.transcription"
        if turn and grouped and grouped[-1][0]["event_type"] == "call.transcription":
            grouped[-1].append(envelope)
        else:
            grouped.append([envelope])
    return grouped


async def _require_workspace(conn: Connection, workspace_id: str) -> None:
    # Row-level security shows the transaction's own workspace row only, if it exists.
    if not await conn.fetchval("SELECT 1 FROM workspaces"):
        raise Unrecordable(f"no workspace {workspace_id}")


async def _effects(conn: Connection, envelope: dict[str, Any]) -> None:
    """What a new event changes besides being marked processed."""
    event_type: str = envelope["event_type"]
    if event_type.startswith("message."):
        await _message(conn, envelope)
    else:
        handler = _HANDLERS.get(event_type)
        if handler is not None:
            await handler(conn, envelope)


async def _turns(conn: Connection, envelopes: list[dict[str, Any]]) -> None:
    """Final turns of one or more calls, in order (their `seq`). No look-up of the calls first:
    the turns' foreign key refuses a turn whose call is not recorded yet, which fails the batch,
    and one event at a time `_call_transcription` then finds the call missing and keeps the
    turn waiting for it."""
    payloads = [e["payload"] for e in envelopes]
    await conn.execute(
        """INSERT INTO turns (id, workspace_id, call_id, role, text, spoken_at)
           SELECT id, $1::text, call_id, role, text, spoken_at
           FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])
                WITH ORDINALITY AS t (id, call_id, role, text, spoken_at, n)
           ORDER BY n
           ON CONFLICT (id) DO NOTHING""",
        envelopes[0]["workspace_id"],
        [p["turn_id"] for p in payloads],
        [e["call_id"] for e in envelopes],
        [p["role"] for p in payloads],
        [p["text"] for p in payloads],
        [parse_iso(e["timestamp"]) for e in envelopes],
    )


async def _call_initiated(conn: Connection, envelope: dict[str, Any]) -> None:
    p = envelope["payload"]
    await conn.execute(
        """INSERT INTO calls (id, workspace_id, agent_id, direction, transport, from_number,
                              to_number, status, started_at)
           VALUES ($1, $2, (SELECT id FROM agents WHERE id = $3), $4, $5, $6, $7, 'in_progress', $8)
           ON CONFLICT (id) DO NOTHING""",
        envelope["call_id"],
        envelope["workspace_id"],
        envelope.get("agent_id"),
        p["direction"],
        p["transport"],
        p["from_number"],
        p["to_number"],
        parse_iso(envelope["timestamp"]),
    )
    await _release_waiting(conn, envelope["call_id"])


async def _release_waiting(conn: Connection, parent_id: str) -> None:
    """Applies the events that arrived before `parent_id` was recorded, oldest first, each in
    a savepoint: one that fails for good is parked, and cannot undo its parent."""
    await parking.hold_parent(conn, parent_id)
    for waiting in await parking.take_waiting(conn, parent_id):
        try:
            async with savepoint(conn):
                await apply(conn, waiting)
        except Exception as failure:
            if unavailable_dependency(failure) is not None:
                raise
            reason = f"failed after its {parent_id} arrived: {type(failure).__name__}: {failure}"
            await parking.park(conn, RECORDER, waiting, reason)


async def _require_call(conn: Connection, call_id: str) -> None:
    if not await conn.fetchval("SELECT 1 FROM calls WHERE id = $1", call_id):
        raise NotYet(call_id, f"call {call_id} is not recorded yet")


async def _call_completed(conn: Connection, envelope: dict[str, Any]) -> None:
    await _require_call(conn, envelope["call_id"])
    p = envelope["payload"]
    await conn.execute(
        """UPDATE calls SET status = $2, ended_at = $3, ended_by = $4, duration_seconds = $5
           WHERE id = $1 AND status = 'in_progress'""",
        envelope["call_id"],
        p["status"],
        parse_iso(envelope["timestamp"]),
        str(p["ended_by"]),
        float(p["duration_seconds"]),
    )


async def _call_transcription(conn: Connection, envelope: dict[str, Any]) -> None:
    await _require_call(conn, envelope["call_id"])
    p = envelope["payload"]
    await conn.execute(
        """INSERT INTO turns (id, workspace_id, call_id, role, text, spoken_at)
           VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING""",
        p["turn_id"],
        envelope["workspace_id"],
        envelope["call_id"],
        p["role"],
        p["text"],
        parse_iso(envelope["timestamp"]),
    )


async def _call_quality(conn: Connection, envelope: dict[str, Any]) -> None:
    await _require_call(conn, envelope["call_id"])
    await conn.execute(
        "UPDATE calls SET quality = $2::jsonb WHERE id = $1",
        envelope["call_id"],
        orjson.dumps(envelope["payload"]).decode(),
    )


async def _ensure_conversation(conn: Connection, envelope: dict[str, Any]) -> None:
    p = envelope["payload"]
    inbound = p.get("direction") == "inbound"
    customer = p.get("from_number") if inbound else p.get("to_number")
    business = p.get("to_number") if inbound else p.get("from_number")
    if await conn.fetchval(
        "SELECT 1 FROM conversations WHERE id = $1", envelope["conversation_id"]
    ):
        return
    if not customer or not business:
        raise NotYet(
            envelope["conversation_id"],
            f"conversation {envelope['conversation_id']} is not recorded yet",
        )
    await conn.execute(
        """INSERT INTO conversations (id, workspace_id, agent_id, channel, customer_number,
                                      business_number, created_at)
           VALUES ($1, $2, (SELECT id FROM agents WHERE id = $3), $4, $5, $6, $7)
           ON CONFLICT DO NOTHING""",
        envelope["conversation_id"],
        envelope["workspace_id"],
        envelope.get("agent_id"),
        envelope["channel"],
        customer,
        business,
        parse_iso(envelope["timestamp"]),
    )
    await _release_waiting(conn, envelope["conversation_id"])


async def _message(conn: Connection, envelope: dict[str, Any]) -> None:
    await _ensure_conversation(conn, envelope)
    p = envelope["payload"]
    at = parse_iso(envelope["timestamp"])
    status = str(p["status"])
    await conn.execute(
        """INSERT INTO messages (id, workspace_id, conversation_id, direction, text, status,
                                 created_at, updated_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
           ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, updated_at = EXCLUDED.updated_at
           WHERE $8 > (CASE messages.status WHEN 'delivered' THEN 2 WHEN 'read' THEN 3
                                            WHEN 'failed' THEN 4 ELSE 1 END)""",
        p["message_id"],
        envelope["workspace_id"],
        envelope["conversation_id"],
        p["direction"],
        p["text"],
        status,
        at,
        MESSAGE_PROGRESS.get(status, 1),
    )
    await conn.execute(
        """UPDATE conversations SET last_message_at = greatest(last_message_at, $2),
                                    updated_at = now() WHERE id = $1""",
        envelope["conversation_id"],
        at,
    )


async def _mode_changed(conn: Connection, envelope: dict[str, Any]) -> None:
    if not await conn.fetchval(
        "SELECT 1 FROM conversations WHERE id = $1", envelope["conversation_id"]
    ):
        raise NotYet(
            envelope["conversation_id"],
            f"conversation {envelope['conversation_id']} is not recorded yet",
        )
    p = envelope["payload"]
    inserted = await conn.fetchval(
        """INSERT INTO conversation_mode_changes
               (workspace_id, conversation_id, event_id, from_mode, to_mode, actor_user_id,
                changed_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_id) DO NOTHING RETURNING true""",
        envelope["workspace_id"],
        envelope["conversation_id"],
        envelope["event_id"],
        p["from_mode"],
        p["to_mode"],
        str(p["actor_user_id"]),
        parse_iso(envelope["timestamp"]),
    )
    if inserted:  # a change the API made has already updated the conversation itself
        await conn.execute(
            "UPDATE conversations SET ai_mode = $2, updated_at = now() WHERE id = $1",
            envelope["conversation_id"],
            p["to_mode"],
        )


_HANDLERS = {
    "call.initiated": _call_initiated,
    "call.completed": _call_completed,
    "call.transcription": _call_transcription,
    "call.quality": _call_quality,
    "conversation.mode_changed": _mode_changed,
}
