"""Reads of one group's items made as one read (batched_reads.py): the logic, with a read of our
own in place of the database, and the database's batched reads under row-level security."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

import httpx
import pytest

from switchboard.batched_reads import BatchedReads
from switchboard.db import connect_database
from switchboard.ids import new_id
from tests.harness import Workspace
from tests.test_streams import new_call


class Table:
    """Answers reads from a dict of groups, each read held until the test lets it through."""

    def __init__(self, rows: dict[str, dict[str, str]]) -> None:
        self.rows = rows
        self.asked: list[tuple[str, list[str]]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.reading = asyncio.Event()
        self.failure: Exception | None = None

    async def read_many(self, group: str, items: Collection[str]) -> dict[str, str]:
        self.asked.append((group, sorted(items)))
        self.reading.set()
        await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        found = self.rows.get(group, {})
        return {item: found[item] for item in items if item in found}


ROWS = {"ws_a": {"call_1": "in_progress", "call_2": "completed"}, "ws_b": {"call_3": "failed"}}


async def test_items_asked_together_are_read_together_and_a_missing_one_is_missing() -> None:
    table = Table(ROWS)
    reads = BatchedReads[str, str, str | None](table.read_many, None)
    answers = await asyncio.gather(
        reads.read("ws_a", "call_1"),
        reads.read("ws_a", "call_2"),
        reads.read("ws_a", "call_1"),
        reads.read("ws_a", "call_9"),
    )
    assert answers == ["in_progress", "completed", "in_progress", None]
    assert table.asked == [("ws_a", ["call_1", "call_2", "call_9"])]


async def test_items_asked_during_a_read_wait_for_it_and_go_in_the_next_one() -> None:
    table = Table(ROWS)
    reads = BatchedReads[str, str, str | None](table.read_many, None)
    table.gate.clear()
    first = asyncio.create_task(reads.read("ws_a", "call_1"))
    await asyncio.wait_for(table.reading.wait(), 5.0)
    later = [asyncio.create_task(reads.read("ws_a", c)) for c in ("call_2", "call_9", "call_1")]
    await asyncio.sleep(0)
    assert len(table.asked) == 1  # one read per workspace at a time: one pooled connection
    table.gate.set()
    assert await first == "in_progress"
    assert await asyncio.gather(*later) == ["completed", None, "in_progress"]
    assert table.asked == [("ws_a", ["call_1"]), ("ws_a", ["call_1", "call_2", "call_9"])]


async def test_each_group_reads_only_its_own_items() -> None:
    """A workspace's read runs under its row-level security and is never asked another's."""
    table = Table(ROWS)
    reads = BatchedReads[str, str, str | None](table.read_many, None)
    answers = await asyncio.gather(
        reads.read("ws_a", "call_1"), reads.read("ws_b", "call_1"), reads.read("ws_b", "call_3")
    )
    assert answers == ["in_progress", None, "failed"]
    assert sorted(table.asked) == [("ws_a", ["call_1"]), ("ws_b", ["call_1", "call_3"])]


async def test_a_failed_read_fails_its_batch_and_the_next_read_is_made_afresh() -> None:
    table = Table(ROWS)
    reads = BatchedReads[str, str, str | None](table.read_many, None)
    table.failure = ConnectionError("database down")
    outcomes = await asyncio.gather(
        reads.read("ws_a", "call_1"), reads.read("ws_a", "call_2"), return_exceptions=True
    )
    assert all(isinstance(o, ConnectionError) for o in outcomes)
    table.failure = None
    assert await reads.read("ws_a", "call_1") == "in_progress"
    assert reads.reads == 2


async def test_a_caller_that_leaves_does_not_take_the_answer_from_the_others() -> None:
    table = Table(ROWS)
    reads = BatchedReads[str, str, str | None](table.read_many, None)
    table.gate.clear()
    leaving = asyncio.create_task(reads.read("ws_a", "call_1"))
    staying = asyncio.create_task(reads.read("ws_a", "call_1"))
    await asyncio.wait_for(table.reading.wait(), 5.0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    table.gate.set()
    assert await staying == "in_progress"


async def test_a_workspaces_batched_read_never_finds_another_workspaces_rows(
    client: httpx.AsyncClient, database_url: str, workspace: Workspace, other_workspace: Workspace
) -> None:
    ours, theirs = await new_call(client, workspace), await new_call(client, other_workspace)
    missing = new_id("call")
    database = await connect_database(database_url, min_size=1, max_size=2)
    try:
        statuses = await database.call_statuses(workspace.id, [ours, theirs, missing])
        assert set(statuses) == {ours}
        assert (await database.call_statuses(other_workspace.id, [ours, theirs])).keys() == {theirs}
        conversations = await database.existing_conversations(workspace.id, [new_id("conv")])
        assert conversations == {}
    finally:
        await database.close()
