"""The webhook router: a durable consumer that writes one delivery row per matching endpoint,
in the same transaction for all of them, and is acknowledged only after it commits. `route`
takes one event; `route_batch` a fetched batch of one workspace's events, with one lookup of
the endpoints and one insert for the whole batch."""

from __future__ import annotations

from collections.abc import Sequence
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
    return await route_batch(conn, [envelope])


async def route_batch(conn: Connection, envelopes: list[dict[str, Any]]) -> int:
    """Delivery rows for a batch of one workspace's events, in order; returns how many were new.
    The endpoints are read once for the batch, inside its transaction: an endpoint created,
    changed or disabled while the batch runs is seen as it was when the batch began, as an
    event routed a moment earlier would have seen it."""
    endpoints = await conn.fetch("SELECT id, event_types FROM webhook_endpoints WHERE enabled")
    rows = deliveries(endpoints, envelopes)
    if not rows:
        return 0
    inserted = await conn.fetch(
        """INSERT INTO webhook_deliveries
               (id, workspace_id, endpoint_id, event_id, event_type, body)
           SELECT id, $1::text, endpoint_id, event_id, event_type, body
           FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[])
                WITH ORDINALITY AS d (id, endpoint_id, event_id, event_type, body, n)
           ORDER BY n
           ON CONFLICT (endpoint_id, event_id) DO NOTHING RETURNING true""",
        envelopes[0]["workspace_id"],
        *(list(column) for column in zip(*rows, strict=True)),
    )
    return len(inserted)


Delivery = tuple[str, str, str, str, bytes]  # id, endpoint_id, event_id, event_type, body


def deliveries(endpoints: Sequence[Any], envelopes: list[dict[str, Any]]) -> list[Delivery]:
    """The delivery rows a batch makes, event by event in order: one per enabled endpoint whose
    filter (`event_types`, None for every event) takes the event. Each body is serialised once,
    and only for an event that some endpoint takes."""
    rows: list[Delivery] = []
    for envelope in envelopes:
        event_type = envelope["event_type"]
        takers = [
            e["id"] for e in endpoints if e["event_types"] is None or event_type in e["event_types"]
        ]
        if not takers:
            continue
        body = orjson.dumps(envelope)
        rows += [(new_id("del"), t, envelope["event_id"], event_type, body) for t in takers]
    return rows


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
            batch_handler=route_batch,
            filter_subject=filter_subject,
            metrics=metrics,
            wait_limit=wait_limit,
        )
