"""The simulator's record of the calls it has on the air, in a JetStream key-value bucket: a
simulator that was killed (SIGKILL, a crash, a lost machine) ends them when it starts again.
The bus is the only thing a simulator is given, so its memory lives there too."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

from switchboard.bus.connection import EVENT_RETENTION_SECONDS

BUCKET = "switchboard_simulated_calls"
# An entry older than the events of its call is of no use: the call's history is gone.
ENTRY_TTL = float(EVENT_RETENTION_SECONDS)
LIST_TIMEOUT = 5.0  # seconds to wait for each entry while listing


class CallLedger:
    """One workspace's calls on the air, as keys `{workspace_id}.{call_id}` whose value holds
    when the call began. An entry is written before the call's first event and removed only
    once its end is stored, so whatever kills the simulator, every call it began and did not
    end is found here."""

    def __init__(self, kv: KeyValue, workspace_id: str) -> None:
        self.kv = kv
        self.workspace_id = workspace_id

    @classmethod
    async def open(cls, js: JetStreamContext, workspace_id: str) -> CallLedger:
        try:
            kv = await js.key_value(BUCKET)
        except BucketNotFoundError:
            # Two simulators may race to create it: the same config is accepted twice.
            kv = await js.create_key_value(
                KeyValueConfig(bucket=BUCKET, history=1, ttl=ENTRY_TTL, storage=StorageType.FILE)
            )
        return cls(kv, workspace_id)

    def _key(self, call_id: str) -> str:
        return f"{self.workspace_id}.{call_id}"

    async def add(self, call_id: str, started: float) -> None:
        """Records a call that began at `started` (Unix seconds)."""
        await self.kv.put(self._key(call_id), orjson.dumps({"started": started}))

    async def remove(self, call_id: str) -> None:
        await self.kv.delete(self._key(call_id))

    async def calls(self) -> dict[str, float]:
        """The calls on record for this workspace: call id -> when it began (Unix seconds)."""
        found: dict[str, float] = {}
        watcher = await self.kv.watch(f"{self.workspace_id}.*", ignore_deletes=True)
        try:
            # The watcher sends every current entry, then None once it has caught up.
            updates: Callable[..., Awaitable[KeyValue.Entry | None]] = watcher.updates
            while (entry := await updates(timeout=LIST_TIMEOUT)) is not None:
                try:
                    started = float(orjson.loads(entry.value or b"{}").get("started", 0.0))
                except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                    started = 0.0
                found[entry.key.split(".", 1)[1]] = started
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return found
