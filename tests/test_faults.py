"""Faults in the bus: a write whose event the bus does not take is refused whole (503, nothing
stored), and the server recovers when NATS comes back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from switchboard.config import Settings
from switchboard.embedded import EmbeddedNats
from tests.harness import ServerThread, Workspace, eventually

pytestmark = pytest.mark.slow


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


async def test_bus_down_refuses_writes_whole_and_recovers(
    own_nats: EmbeddedNats, database_url: str, workspace: Workspace
) -> None:
    settings = Settings(database_url=database_url, nats_url=own_nats.client_url)
    server = ServerThread(settings, database_url, own_nats.client_url).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
            h = workspace.headers
            body = {"to_number": "+14155550100", "from_number": "+14155550101"}
            assert (await client.post("/v1/calls", headers=h, json=body)).status_code == 201
            own_nats.stop()
            refused = await client.post("/v1/calls", headers=h, json=body)
            assert refused.status_code == 503
            assert refused.json()["error_code"] == "UNAVAILABLE"
            assert refused.headers["retry-after"] == "1"
            assert (await client.get("/readyz")).status_code == 503
            calls = (await client.get("/v1/calls", headers=h)).json()["calls"]
            assert len(calls) == 1, "the refused call must not exist"
            # NATS returns (same port, same data): the server reconnects and writes flow again.
            own_nats.start()

            async def ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await eventually(ready, within=15)
            assert (await client.post("/v1/calls", headers=h, json=body)).status_code == 201
    finally:
        server.stop()
