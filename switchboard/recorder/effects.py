"""What each event writes, as SQL run inside one workspace-scoped transaction. Every write is
idempotent on its own (ON CONFLICT) and the event is marked processed in the same transaction,
so a redelivery changes nothing."""

from __future__ import annotations

from typing import Any

import orjson

from switchboard.bus import parking
from switchboard.bus.durable import NotYet, Unrecordable
from switchboard.db import Connection
from switchboard.ids import parse_iso
from switchboard.outage import unavailable_dependency

RECORDER = "recorder"  # the consumer named on events the recorder parks

# How far a message has got; a status never moves backwards (a late `delivered` after `read`).
MESSAGE_PROGRESS = {"received": 1, "sent": 1, "delivered": 2, "read": 3, "failed": 4}


async def apply(conn: Connection, envelope: dict[str, Any]) -> bool:
    """Writes the event's effects; False if it had already been processed."""
    if not await conn.fetchval("SELECT 1 FROM workspaces"):
        raise Unrecordable(f"no workspace {envelope['workspace_id']}")
    first = await conn.fetchval(
        """INSERT INTO processed_events (event_id, workspace_id, event_type) VALUES ($1, $2, $3)
           ON CONFLICT (event_id) DO NOTHING RETURNING true""",
        envelope["event_id"],
        envelope["workspace_id"],
        envelope["event_type"],
    )
    if not first:
        return False
    event_type: str = envelope["event_type"]
    if event_type.startswith("message."):
        await _message(conn, envelope)
    else:
        handler = _HANDLERS.get(event_type)
        if handler is not None:
            await handler(conn, envelope)
    return True


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
            async with conn.transaction():
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
