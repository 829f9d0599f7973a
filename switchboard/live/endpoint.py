"""What the three stream endpoints share: their services, their kind for metrics, the drop
counter of their outboxes, and the check of the id in their path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.types import Scope, Send

from switchboard.api.deps import Services
from switchboard.api.responses import send_error
from switchboard.errors import ApiError
from switchboard.ids import is_id
from switchboard.live.hub import View
from switchboard.live.outbox import Outbox


class StreamEndpoint:
    kind = ""

    def __init__(self, services: Services) -> None:
        self.services = services

    def dropped(self) -> None:
        self.services.metrics.frames_dropped[self.kind] += 1

    def new_outbox(self) -> Outbox:
        return Outbox(self.services.settings.stream_buffer, self.dropped)

    @asynccontextmanager
    async def watching(
        self, workspace_id: str, watches: list[tuple[str, View]], outbox: Outbox
    ) -> AsyncIterator[None]:
        """Subscribes the outbox (before the caller reads any state, so nothing that happens
        in between is missed) and always unsubscribes it, however the stream ends."""
        hub = self.services.hub
        try:
            for subject, view in watches:
                await hub.watch(subject, workspace_id, view, outbox)
            yield
        finally:
            for subject, view in watches:
                await hub.unwatch(subject, view, outbox)

    async def path_id(self, scope: Scope, send: Send, name: str, prefix: str) -> str | None:
        """The well-formed id in the path, or None after answering 400. The check also keeps
        NATS wildcards (`*`, `>`) and dots out of the subjects built from the id."""
        value = str(scope["path_params"][name])
        if is_id(value, prefix):
            return value
        message = f"{name}: must be an id of the form {prefix}_..."
        await send_error(scope, send, ApiError("INVALID_ARGUMENT", message))
        return None
