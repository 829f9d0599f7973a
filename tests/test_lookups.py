"""What a stream's open asks the database, shared and remembered (live/lookups.py,
shared_lookups.py): the logic, with a read of our own in place of the database (the streams'
tests use the real one)."""

from __future__ import annotations

import asyncio

import pytest

from switchboard.live.lookups import IN_PROGRESS_SECONDS, keep_call_status, keep_existence
from switchboard.shared_lookups import SharedLookups

Key = tuple[str, str]


class Rows:
    """Answers reads from a dict, each held until the test lets it through."""

    def __init__(self, rows: dict[Key, str | None]) -> None:
        self.rows = rows
        self.asked: list[Key] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.failure: Exception | None = None

    async def read(self, key: Key) -> str | None:
        self.asked.append(key)
        await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return self.rows.get(key)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def waiting_readers(count: int) -> None:
    """Lets `count` tasks reach their wait (each await of a started task is one loop turn)."""
    for _ in range(count + 2):
        await asyncio.sleep(0)


async def test_opens_that_ask_at_once_share_one_read() -> None:
    rows = Rows({("ws_a", "call_1"): "in_progress"})
    lookups = SharedLookups(rows.read, keep_call_status, Clock())
    rows.gate.clear()
    opens = [asyncio.create_task(lookups.get(("ws_a", "call_1"))) for _ in range(100)]
    await waiting_readers(100)
    rows.gate.set()
    assert await asyncio.gather(*opens) == ["in_progress"] * 100
    assert rows.asked == [("ws_a", "call_1")]


async def test_in_progress_is_kept_for_a_second_an_end_for_good_and_not_found_never() -> None:
    clock = Clock()
    rows = Rows({("ws_a", "live"): "in_progress", ("ws_a", "ended"): "completed"})
    lookups = SharedLookups(rows.read, keep_call_status, clock)
    for key in [("ws_a", "live"), ("ws_a", "ended"), ("ws_a", "missing")] * 2:
        await lookups.get(key)
    # Asked again: only the call not found (it may be recorded a moment later).
    first_reads = [("ws_a", "live"), ("ws_a", "ended"), ("ws_a", "missing")]
    assert rows.asked == [*first_reads, ("ws_a", "missing")]
    clock.now += IN_PROGRESS_SECONDS
    rows.rows[("ws_a", "live")] = "completed"
    assert await lookups.get(("ws_a", "live")) == "completed"
    clock.now += 10**6
    assert await lookups.get(("ws_a", "ended")) == "completed"
    assert rows.asked.count(("ws_a", "live")) == 2 and rows.asked.count(("ws_a", "ended")) == 1


async def test_another_workspaces_answer_never_serves_an_open() -> None:
    rows = Rows({("ws_a", "call_1"): "in_progress"})
    lookups = SharedLookups(rows.read, keep_call_status, Clock())
    assert await lookups.get(("ws_a", "call_1")) == "in_progress"
    assert await lookups.get(("ws_b", "call_1")) is None


async def test_a_failed_read_fails_every_open_waiting_on_it_and_is_not_kept() -> None:
    rows = Rows({("ws_a", "call_1"): "completed"})
    lookups = SharedLookups(rows.read, keep_call_status, Clock())
    rows.gate.clear()
    rows.failure = ConnectionError("the database is down")
    opens = [asyncio.create_task(lookups.get(("ws_a", "call_1"))) for _ in range(3)]
    await waiting_readers(3)
    rows.gate.set()
    results = await asyncio.gather(*opens, return_exceptions=True)
    assert all(isinstance(result, ConnectionError) for result in results)
    rows.failure = None
    assert await lookups.get(("ws_a", "call_1")) == "completed"
    assert len(rows.asked) == 2


async def test_when_the_open_that_reads_leaves_the_others_read_for_themselves() -> None:
    rows = Rows({("ws_a", "call_1"): "in_progress"})
    lookups = SharedLookups(rows.read, keep_call_status, Clock())
    rows.gate.clear()
    first = asyncio.create_task(lookups.get(("ws_a", "call_1")))
    await waiting_readers(1)
    second = asyncio.create_task(lookups.get(("ws_a", "call_1")))
    await waiting_readers(1)
    first.cancel()
    await waiting_readers(2)
    rows.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second == "in_progress"
    assert len(rows.asked) == 2


async def test_the_oldest_answers_go_first_past_the_bound() -> None:
    rows = Rows({("ws_a", f"call_{i}"): "completed" for i in range(3)})
    lookups = SharedLookups(rows.read, keep_call_status, Clock(), max_kept=2)
    for i in range(3):
        await lookups.get(("ws_a", f"call_{i}"))
    await lookups.get(("ws_a", "call_2"))
    await lookups.get(("ws_a", "call_0"))
    assert rows.asked.count(("ws_a", "call_2")) == 1
    assert rows.asked.count(("ws_a", "call_0")) == 2


def test_an_existing_conversation_is_kept_and_a_missing_one_is_not() -> None:
    assert keep_existence(True) == float("inf")
    assert keep_existence(False) == 0.0
