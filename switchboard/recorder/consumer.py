"""The recorder: the durable consumer whose handler writes each event's effects."""

from __future__ import annotations

from switchboard.bus import Bus
from switchboard.bus.durable import WAIT_LIMIT, EventConsumer
from switchboard.db import Database
from switchboard.live.metrics import Metrics
from switchboard.recorder.effects import apply, apply_batch

DURABLE = "recorder"


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
