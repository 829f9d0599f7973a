"""The webhook router: a durable consumer that writes one delivery row per matching endpoint,
in the same transaction for all of them, and is acknowledged only after it commits."""

from __future__ import annotations

from typing import Any

import orjson

from switchboard.bus import Bus
from switchboard.bus.durable import WAIT_LIMIT, EventConsumer
from switchboard.db import Connection, Database
from switchboard.ids import new_id
from switchboard.live.metrics import Metrics

DURABLE = "webhooks-router"


async def route(conn: Connection, envelope: dict[str, Any]) -> int:
    """Delivery rows for every enabled endpoint whose filter takes this event; returns how many
    were new (a redelivered event finds its rows and adds none)."""
    endpoints = await conn.fetch(
        """SELECT id FROM webhook_endpoints
           WHERE enabled AND (event_types IS NULL OR $1 = ANY (event_types))""",
        envelope["event_type"],
    )
    body = orjson.dumps(envelope)
    created = 0
    for endpoint in endpoints:
        inserted = await conn.fetchval(
            """INSERT INTO webhook_deliveries
                   (id, workspace_id, endpoint_id, event_id, event_type, body)
               VALUES ($1, $2, $3, $4, $5, $6)
               ON CONFLICT (endpoint_id, event_id) DO NOTHING RETURNING true""",
            new_id("del"),
            envelope["workspace_id"],
            endpoint["id"],
            envelope["event_id"],
            envelope["event_type"],
            body,
        )
        created += bool(inserted)
    return created


class WebhookRouter(EventConsumer):
    def __init__(
        self,
        database: Database,
        bus: Bus,
        *,
        durable: str = DURABLE,
        filter_subject: str = "vb.>",
        metrics: Metrics | None = None,
        wait_limit: float = WAIT_LIMIT,
    ) -> None:
        super().__init__(
            database,
            bus,
            route,
            durable=durable,
            filter_subject=filter_subject,
            metrics=metrics,
            wait_limit=wait_limit,
        )
