"""Issue 9: calls played by the simulator always end, on the real NATS. A stop ends the calls
on the air (`call.completed`, `failed`, ended by the `system`, stored in JetStream); a start
ends those a killed simulator left behind, and only those."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from switchboard.ids import new_id
from switchboard.live.history import call_history
from switchboard.producer import Producer
from switchboard.simulate import SimulationPlan, Simulator
from switchboard.simulate.ledger import CallLedger
from tests.harness import Workspace, eventually
from tests.test_producers import WorkspaceRecorder

WAIT = 15.0


@pytest.fixture
async def recorder(
    database_url: str, nats_url: str, workspace: Workspace
) -> AsyncIterator[WorkspaceRecorder]:
    running = WorkspaceRecorder(database_url, nats_url, workspace.id)
    await running.start()
    yield running
    await running.stop()


async def events_of(bus: Client, workspace_id: str, call_id: str) -> list[dict[str, Any]]:
    """The call's events as JetStream stored them."""
    return [e async for e in call_history(bus, workspace_id, call_id)]


async def ended_by_the_system(bus: Client, workspace_id: str, call_id: str) -> bool:
    """Whether the call's stored events end with exactly one completion, failed by the system."""
    kinds = [(e["event_type"], e["payload"]) for e in await events_of(bus, workspace_id, call_id)]
    completions = [payload for kind, payload in kinds if kind == "call.completed"]
    return (
        kinds[0][0] == "call.initiated"
        and kinds[-1][0] == "call.completed"
        and len(completions) == 1
        and completions[0]["status"] == "failed"
        and completions[0]["ended_by"] == "system"
    )


@contextlib.asynccontextmanager
async def initiated_calls(bus: Client, workspace_id: str) -> AsyncIterator[list[str]]:
    """The ids of calls whose `call.initiated` goes out on the bus while inside."""
    seen: list[str] = []

    async def note(msg: Msg) -> None:
        envelope = orjson.loads(msg.data)
        if envelope["event_type"] == "call.initiated":
            seen.append(envelope["call_id"])

    subscription = await bus.subscribe(f"vb.{workspace_id}.call.*.events", cb=note)
    await bus.flush()
    try:
        yield seen
    finally:
        await subscription.unsubscribe()


async def test_a_stopped_simulator_ends_its_calls_as_failed_by_the_system(
    recorder: WorkspaceRecorder,
    workspace: Workspace,
    bus: Client,
    client: httpx.AsyncClient,
) -> None:
    # Real pace: each call lasts tens of seconds, so both are on the air when it stops.
    plan = SimulationPlan(workspace.id, calls=2, conversations=1, seed=11, forever=True)
    simulator = Simulator(bus, plan)
    async with initiated_calls(bus, workspace.id) as calls:
        await simulator.start()
        try:
            await eventually(lambda: len(calls) == 2, within=WAIT)
        finally:
            await simulator.stop()
    assert simulator.finished_calls == [] and simulator.live_calls == {}
    for call_id in calls:
        assert await ended_by_the_system(bus, workspace.id, call_id), call_id

    # The recorder agrees: no call of the simulator is left in progress.
    async def all_failed() -> bool:
        listed = await client.get("/v1/calls", headers=workspace.headers)
        return sorted(c["status"] for c in listed.json()["calls"]) == ["failed", "failed"]

    await eventually(all_failed, within=WAIT)


async def test_a_start_ends_the_calls_left_behind_and_only_those(
    workspace: Workspace, bus: Client
) -> None:
    """The ledger may be a step behind the bus: a call whose end is stored is not ended twice,
    and one that never began is not ended at all; all three leave the record."""
    producer = Producer(bus)
    ledger = await CallLedger.open(bus.jetstream(), workspace.id)
    left, ended, unborn = new_id("call"), new_id("call"), new_id("call")
    for call_id in (left, ended):
        await producer.event(
            "call.initiated",
            workspace_id=workspace.id,
            call_id=call_id,
            payload={
                "direction": "inbound",
                "from_number": "+14155550123",
                "to_number": "+14155550000",
                "transport": "sip",
            },
        )
    await producer.event(
        "call.completed",
        workspace_id=workspace.id,
        call_id=ended,
        payload={"status": "completed", "duration_seconds": 2.0, "ended_by": "user"},
    )
    for call_id in (left, ended, unborn):
        await ledger.add(call_id, 0.0)
    assert set(await ledger.calls()) == {left, ended, unborn}

    simulator = Simulator(bus, SimulationPlan(workspace.id, calls=0, conversations=0))
    await simulator.start()
    await simulator.stop()
    assert await ended_by_the_system(bus, workspace.id, left)
    assert simulator.ended_calls == [left]
    assert [e["event_type"] for e in await events_of(bus, workspace.id, ended)] == [
        "call.initiated",
        "call.completed",
    ]
    assert await events_of(bus, workspace.id, unborn) == []
    assert await ledger.calls() == {}


@pytest.mark.slow
async def test_a_killed_simulators_calls_are_ended_by_the_next_start(
    workspace: Workspace, bus: Client, nats_url: str, database_url: str
) -> None:
    command = [
        sys.executable,
        "-m",
        "switchboard",
        "simulate",
        "--workspace",
        workspace.id,
        "--calls",
        "2",
        "--conversations",
        "0",
        "--forever",
    ]
    env = {**os.environ, "SWITCHBOARD_NATS_URL": nats_url, "SWITCHBOARD_DATABASE_URL": database_url}
    async with initiated_calls(bus, workspace.id) as calls:
        process = subprocess.Popen(  # noqa: ASYNC220 - started once, killed below
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            await eventually(lambda: len(calls) == 2, within=30)
        finally:
            process.send_signal(signal.SIGKILL)
            await asyncio.get_running_loop().run_in_executor(None, process.wait, 10)
    for call_id in calls:  # killed mid-call: nothing ended them
        kinds = [e["event_type"] for e in await events_of(bus, workspace.id, call_id)]
        assert kinds[0] == "call.initiated" and "call.completed" not in kinds

    simulator = Simulator(bus, SimulationPlan(workspace.id, calls=0, conversations=0))
    await simulator.start()
    await simulator.stop()
    for call_id in calls:
        assert await ended_by_the_system(bus, workspace.id, call_id), call_id
    assert sorted(simulator.ended_calls) == sorted(calls)
    # Once ended, they are off the record: the next start ends nothing.
    again = Simulator(bus, SimulationPlan(workspace.id, calls=0, conversations=0))
    await again.start()
    await again.stop()
    assert again.ended_calls == []
