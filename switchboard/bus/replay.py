"""Replaying parked events, for operators (`switchboard events replay`): each goes back through
the consumer that parked it, inside one workspace transaction; one that fails again is parked
again with the new reason, and one whose call or conversation is still missing waits again."""

from __future__ import annotations

from switchboard.bus import parking
from switchboard.bus.durable import Handler, NotYet
from switchboard.db import Database
from switchboard.db.scoped import savepoint
from switchboard.outage import unavailable_dependency
from switchboard.recorder.effects import apply
from switchboard.webhooks.router import DURABLE as ROUTER
from switchboard.webhooks.router import route


def handler_for(consumer: str) -> Handler:
    return route if consumer.startswith(ROUTER) else apply


async def replay(database: Database, workspace_id: str, event_id: str) -> list[tuple[str, str]]:
    """(consumer, outcome) for each consumer that had parked `event_id`; outcome is "applied",
    "waiting" or "parked: <reason>". Empty when nothing of that id is parked."""
    outcomes: list[tuple[str, str]] = []
    async with database.workspace(workspace_id) as conn:
        for consumer, envelope in await parking.take_parked(conn, event_id):
            try:
                async with savepoint(conn):
                    await handler_for(consumer)(conn, envelope)
                outcomes.append((consumer, "applied"))
            except NotYet as later:
                await parking.hold_parent(conn, later.parent_id)
                await parking.wait_for(conn, consumer, envelope, later.parent_id, str(later))
                outcomes.append((consumer, "waiting"))
            except Exception as failure:
                if unavailable_dependency(failure) is not None:
                    raise
                reason = f"replay failed: {type(failure).__name__}: {failure}"
                await parking.park(conn, consumer, envelope, reason)
                outcomes.append((consumer, f"parked: {reason}"))
    return outcomes
