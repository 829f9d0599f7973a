"""Database rows to API bodies: one function per resource, timestamps in the API's format."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from switchboard.ids import iso_ms


def ts(value: datetime | None) -> str | None:
    return None if value is None else iso_ms(value)


def workspace(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "created_at": ts(row["created_at"])}


def api_key(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "mode": row["mode"],
        "display_prefix": row["display_prefix"],
        "created_at": ts(row["created_at"]),
        "revoked_at": ts(row["revoked_at"]),
    }


def agent(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "instructions": row["instructions"],
        "created_at": ts(row["created_at"]),
        "updated_at": ts(row["updated_at"]),
    }


def call(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "agent_id": row["agent_id"],
        "direction": row["direction"],
        "transport": row["transport"],
        "from_number": row["from_number"],
        "to_number": row["to_number"],
        "status": row["status"],
        "started_at": ts(row["started_at"]),
        "ended_at": ts(row["ended_at"]),
        "ended_by": row["ended_by"],
        "duration_seconds": row["duration_seconds"],
        "quality": orjson.loads(row["quality"]) if row["quality"] else None,
    }


def turn(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "role": row["role"],
        "text": row["text"],
        "spoken_at": ts(row["spoken_at"]),
    }


def conversation(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "agent_id": row["agent_id"],
        "channel": row["channel"],
        "customer_number": row["customer_number"],
        "business_number": row["business_number"],
        "ai_mode": row["ai_mode"],
        "created_at": ts(row["created_at"]),
        "updated_at": ts(row["updated_at"]),
        "last_message_at": ts(row["last_message_at"]),
    }


def message(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "conversation_id": row["conversation_id"],
        "direction": row["direction"],
        "text": row["text"],
        "status": row["status"],
        "created_at": ts(row["created_at"]),
        "updated_at": ts(row["updated_at"]),
    }
