"""Where the durable consumers put events they cannot apply now or at all (table
`parked_events`), so that one workspace's poison never holds up another's events on the bus:
an event *waits* for the call or conversation an earlier event will record, and is applied the
moment that one is; an event that waited too long, or failed every attempt, is *parked* for an
operator to see and replay (`switchboard events parked`, `switchboard events replay`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from switchboard.db import Connection


async def hold_parent(conn: Connection, parent_id: str) -> None:
    """Serialises "is the parent recorded? then wait for it" against "record the parent, then
    release its waiters" until the transaction ends, so no waiter is left behind by a race
    between two replicas (each would otherwise miss the other's uncommitted row)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", parent_id)


async def wait_for(
    conn: Connection, consumer: str, envelope: Mapping[str, Any], parent_id: str, reason: str
) -> None:
    """Keeps the event until `parent_id` is recorded (the caller holds `hold_parent`)."""
    await _insert(conn, consumer, envelope, "waiting", reason, parent_id)


async def park(conn: Connection, consumer: str, envelope: Mapping[str, Any], reason: str) -> None:
    """Gives up on the event until an operator replays it."""
    await _insert(conn, consumer, envelope, "parked", reason, None)


async def _insert(
    conn: Connection,
    consumer: str,
    envelope: Mapping[str, Any],
    status: str,
    reason: str,
    waits_for: str | None,
) -> None:
    await conn.execute(
        """INSERT INTO parked_events (consumer, event_id, workspace_id, status, waits_for,
                                      event_type, body, reason, parked_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8,
                   CASE WHEN $4 = 'parked' THEN now() END)
           ON CONFLICT (consumer, event_id) DO UPDATE
               SET status = EXCLUDED.status, waits_for = EXCLUDED.waits_for,
                   reason = EXCLUDED.reason, parked_at = EXCLUDED.parked_at""",
        consumer,
        envelope["event_id"],
        envelope["workspace_id"],
        status,
        waits_for,
        envelope["event_type"],
        orjson.dumps(envelope),
        # Postgres text refuses NUL; a reason quotes producer data at most by its type name.
        reason.replace("\x00", "")[:500],
    )


async def take_waiting(conn: Connection, parent_id: str) -> list[dict[str, Any]]:
    """Removes and returns the events waiting for `parent_id`, oldest first (the caller holds
    `hold_parent` and applies them in the same transaction)."""
    rows = await conn.fetch(
        """DELETE FROM parked_events WHERE status = 'waiting' AND waits_for = $1
           RETURNING seq, body""",
        parent_id,
    )
    return [orjson.loads(row["body"]) for row in sorted(rows, key=lambda r: int(r["seq"]))]


async def parked(conn: Connection, limit: int = 100) -> list[dict[str, Any]]:
    """The workspace's waiting and parked events, oldest first, for operators."""
    rows = await conn.fetch(
        """SELECT consumer, event_id, status, waits_for, event_type, reason, created_at, parked_at
           FROM parked_events ORDER BY seq LIMIT $1""",
        limit,
    )
    return [dict(row) for row in rows]


async def take_parked(conn: Connection, event_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Removes and returns (consumer, envelope) of a parked event, for a replay in the same
    transaction (a replay that fails again parks it again)."""
    rows = await conn.fetch(
        """DELETE FROM parked_events WHERE event_id = $1 AND status = 'parked'
           RETURNING consumer, body""",
        event_id,
    )
    return [(str(row["consumer"]), orjson.loads(row["body"])) for row in rows]
