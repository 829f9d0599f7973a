"""The recorder: the durable consumer whose handler writes each event's effects."""

from __future__ import annotations

from typing import Any

from switchboard.bus import Bus
from switchboard.bus.durable import WAIT_LIMIT, EventConsumer
from switchboard.db import Database
from switchboard.live.metrics import Metrics
from switchboard.recorder.effects import apply, apply_batch, has_effects

DURABLE = "recorder"
# Workspaces remembered as existing, at most: past this the memory starts again (a check each).
KNOWN_WORKSPACES = 100_000


class Recorder(EventConsumer):
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
            apply,
            durable=durable,
            batch_handler=apply_batch,
            filter_subject=filter_subject,
            metrics=metrics,
            wait_limit=wait_limit,
        )
        # Workspaces whose existence a committed batch checked. Workspaces are never deleted,
        # so one seen once needs no second look.
        self.known_workspaces: set[str] = set()

    async def _apply_at_once(self, workspace_id: str, envelopes: list[dict[str, Any]]) -> None:
        """A batch the recorder writes nothing for (silences, barge-ins, DTMF ...) in a
        workspace known to exist is settled without a transaction: the transaction would only
        have checked the workspace again. Most call events are of that kind, and a transaction
        costs five round trips to Postgres (issue 13, the WebSocket's CPU per frame)."""
        quiet = not any(map(has_effects, envelopes))
        if quiet and workspace_id in self.known_workspaces:
            return
        await super()._apply_at_once(workspace_id, envelopes)
        # Only a quiet batch's transaction is sure to have checked the workspace (`apply_batch`
        # does; a batch of events already processed writes nothing and checks nothing).
        if quiet:
            if len(self.known_workspaces) >= KNOWN_WORKSPACES:
                self.known_workspaces.clear()
            self.known_workspaces.add(workspace_id)
