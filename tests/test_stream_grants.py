"""The open-stream limit as grants (switchboard/limits/grants.py, slots.py): the rules as a pure
core, then two processes' limits on a real NATS, where concurrent opens never pass the limit
however late the reports are heard, a freed slot can be taken by the other process, a dead
process's grants are dropped, and a bus that does not answer leaves the reports to decide."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from switchboard.bus import connect_bus
from switchboard.embedded import EmbeddedNats
from switchboard.limits.book import STALE_AFTER
from switchboard.limits.grants import SHORT_FRESH, Grant, encode, parse, plan
from switchboard.limits.shared import SharedLimits
from tests.harness import eventually

NOW = 1_700_000_000.0


def everyone_alive(_replica: str, _at: float) -> bool:
    return True


# --- the rules -------------------------------------------------------------------------------


def test_a_grant_takes_what_is_needed_and_spare_slots_only_as_far_as_the_limit() -> None:
    assert plan({}, "a", 3, 1000, NOW, everyone_alive).slots == 3
    spared = plan({}, "a", 3, 1000, NOW, everyone_alive, spare=3).ledger["a"]
    assert (spared.slots, spared.busy, spared.spare) == (6, 3, 3)
    near = plan({"a": Grant(995, NOW)}, "b", 8, 1000, NOW, everyone_alive, spare=8)
    assert near.slots == 5 and near.ledger == {"a": Grant(995, NOW), "b": Grant(5, NOW, 5)}
    assert not near.short  # A's slots are all busy: nothing to ask for
    # Needing nothing, a process leaves the ledger.
    assert "b" not in plan(near.ledger, "b", 0, 1000, NOW, everyone_alive).ledger


def test_a_process_short_of_slots_the_others_hold_spare_is_marked_and_stops_their_spares() -> None:
    ledger = {"a": Grant(10, NOW, busy=4)}
    short = plan(ledger, "b", 2, 10, NOW, everyone_alive, spare=2)
    assert short.short and short.slots == 0 and short.ledger["b"] == Grant(0, NOW, 0, True)
    # Once it has asked, it decides on what it reads: no mark.
    assert "b" not in plan(ledger, "b", 2, 10, NOW, everyone_alive, may_ask=False).ledger
    # While the mark is fresh, A takes no spare slots; a stale one is dropped and ignored.
    after_give_back = {**short.ledger, "a": Grant(4, NOW, 4)}
    assert plan(after_give_back, "a", 5, 10, NOW + 1, everyone_alive, spare=5).slots == 5
    later = plan(after_give_back, "a", 5, 10, NOW + SHORT_FRESH + 1, everyone_alive, spare=5)
    assert later.slots == 7 and set(later.ledger) == {"a"}  # spares: half of what is left


def test_spare_slots_take_at_most_half_of_what_is_left() -> None:
    assert plan({}, "a", 10, 1000, NOW, everyone_alive, spare=10).slots == 20
    assert plan({"b": Grant(980, NOW)}, "a", 10, 1000, NOW, everyone_alive, spare=10).slots == 15
    assert plan({"b": Grant(989, NOW)}, "a", 10, 1000, NOW, everyone_alive, spare=10).slots == 10


def test_grants_never_sum_past_the_limit_whoever_asks_and_in_any_order() -> None:
    ledger: dict[str, Grant] = {}
    limit = 50
    asks = [("a", 7), ("b", 30), ("c", 20), ("a", 40), ("b", 45), ("c", 1), ("a", 0), ("c", 50)]
    for replica, need in asks:
        ledger = plan(ledger, replica, need, limit, NOW, everyone_alive).ledger
        assert sum(g.slots for g in ledger.values()) <= limit
    # What A no longer needed went back, and C, asking for everything, took all that was left.
    assert "a" not in ledger
    assert ledger["c"].slots == limit - ledger["b"].slots


def test_the_grants_of_a_process_that_stopped_beating_are_dropped() -> None:
    ledger = {"dead": Grant(40, NOW - STALE_AFTER - 1), "live": Grant(5, NOW - STALE_AFTER - 1)}

    def alive(replica: str, at: float) -> bool:
        return replica == "live" or at >= NOW - STALE_AFTER

    planned = plan(ledger, "me", 45, 50, NOW, alive)
    assert set(planned.ledger) == {"live", "me"} and planned.slots == 45


def test_a_malformed_ledger_reads_as_empty_and_a_ledger_reads_back_as_written() -> None:
    for bad in (b"", b"not json", b"[1, 2]", b'{"a": "x"}', b'{"a": [1]}'):
        assert parse(bad) == {}
    ledger = {"a": Grant(3, NOW, 3), "b": Grant(7, NOW + 1.5, 2, True)}
    assert parse(encode(ledger)) == ledger
    # As first written: slots and time, every slot busy.
    assert parse(b'{"a": [3, 1.5]}') == {"a": Grant(3, 1.5)}


# --- two processes on a real NATS ------------------------------------------------------------

LIMIT = 10


class Clock:
    """Wall clock, plus a jump a test can make (to age another process's heartbeat)."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def __call__(self) -> float:
        return time.time() + self.ahead


@contextlib.asynccontextmanager
async def process_limits(
    nats_url: str,
    clock: Callable[[], float] = time.time,
    *,
    release: bool = True,
    limit: int = LIMIT,
) -> AsyncIterator[SharedLimits]:
    bus = await connect_bus(nats_url)
    limits = SharedLimits(
        bus, rate_per_minute=1_000_000, max_streams=limit, burst_seconds=60.0, clock=clock
    )
    await limits.start()
    try:
        yield limits
    finally:
        if release:
            await limits.stop()
        await bus.close()


@contextlib.asynccontextmanager
async def two_processes(
    nats_url: str, limit: int = LIMIT
) -> AsyncIterator[tuple[SharedLimits, SharedLimits]]:
    async with (
        process_limits(nats_url, limit=limit) as a,
        process_limits(nats_url, limit=limit) as b,
    ):
        yield a, b


async def fill_one(full: SharedLimits, other: SharedLimits) -> None:
    """`full` takes every slot; `other` has read the ledger and found no room."""
    assert await open_many(full, LIMIT) == LIMIT
    assert await open_many(other, 1) == 0


async def open_many(limits: SharedLimits, count: int, workspace_id: str = "ws_a") -> int:
    verdicts = await asyncio.gather(*(limits.open_stream(workspace_id) for _ in range(count)))
    return sum(1 for v in verdicts if v.allowed)


async def test_concurrent_opens_on_two_processes_never_pass_the_limit(
    own_nats: EmbeddedNats,
) -> None:
    async with two_processes(own_nats.client_url) as (a, b):
        # Both at once, before either has heard a report from the other.
        admitted = await asyncio.gather(open_many(a, 30), open_many(b, 30))
        assert sum(admitted) == LIMIT
        refused = await a.open_stream("ws_a")
        assert not refused.allowed and refused.kind == "open_streams"
        assert refused.headers()["X-RateLimit-Limit"] == str(LIMIT)
        # Another workspace has its own slots.
        assert await open_many(b, LIMIT + 1, "ws_b") == LIMIT


async def test_a_closed_stream_frees_its_slot_for_the_other_process(
    own_nats: EmbeddedNats,
) -> None:
    async with two_processes(own_nats.client_url) as (a, b):
        await fill_one(a, b)
        for _ in range(3):
            a.close_stream("ws_a")

        async def b_opened() -> bool:
            return (await b.open_stream("ws_a")).allowed

        # A gives the slots back in the background, within a report's pace and a write.
        for _ in range(3):
            assert await eventually(b_opened, within=5)
        assert await open_many(b, 5) == 0
        assert await open_many(a, 5) == 0


async def test_a_dead_process_grants_are_dropped_once_it_stops_beating(
    own_nats: EmbeddedNats,
) -> None:
    clock = Clock()
    async with process_limits(own_nats.client_url, clock) as b:
        async with process_limits(own_nats.client_url, release=False) as a:
            assert await open_many(a, LIMIT) == LIMIT
            assert a._reporter is not None
            a._reporter.cancel()  # it dies: no release, no more heartbeats
        assert await open_many(b, 1) == 0
        clock.ahead = STALE_AFTER + 1  # as seen by B, A's last sign of life is now stale
        assert await open_many(b, LIMIT + 5) == LIMIT


async def test_with_the_bus_down_the_reports_decide_and_nothing_hangs(
    own_nats: EmbeddedNats,
) -> None:
    async with process_limits(own_nats.client_url) as a:
        assert await open_many(a, 2) == 2
        own_nats.stop()
        started = time.monotonic()
        # No ledger to write: this process counts alone, from what it has (its own 2).
        assert await open_many(a, LIMIT) == LIMIT - 2
        assert time.monotonic() - started < 10
        own_nats.start()


@pytest.mark.parametrize("closes", [1, LIMIT])
async def test_a_process_gives_back_what_its_closed_streams_held(
    own_nats: EmbeddedNats, closes: int
) -> None:
    async with process_limits(own_nats.client_url) as a:
        assert await open_many(a, LIMIT) == LIMIT
        for _ in range(closes):
            a.close_stream("ws_a")
        await eventually(lambda: a.slots.held.get("ws_a", 0) == LIMIT - closes)
        assert a.slots.used.get("ws_a", 0) == LIMIT - closes


async def test_a_storm_on_two_processes_opens_exactly_the_limit_not_fewer(
    own_nats: EmbeddedNats,
) -> None:
    """No slot is left idle with one process while the other refuses: a limit of 200 and 300
    opens at once on each process leave exactly 200 open."""
    async with two_processes(own_nats.client_url, limit=200) as (a, b):
        admitted = await asyncio.gather(open_many(a, 300), open_many(b, 300))
        assert sum(admitted) == 200


async def test_a_flood_of_opens_over_the_limit_does_not_read_the_ledger_for_each(
    own_nats: EmbeddedNats,
) -> None:
    async with two_processes(own_nats.client_url) as (a, b):
        assert await open_many(a, LIMIT) == LIMIT
        reads = 0
        real_get = b.slots.kv.get

        async def counted_get(key: str) -> KeyValue.Entry:
            nonlocal reads
            reads += 1
            return await real_get(key)

        b.slots.kv.get = counted_get  # type: ignore[method-assign,assignment]
        assert await open_many(b, 500) == 0
        # One read found no room for every open that came before it began; the few after.
        assert 1 <= reads <= 5


async def test_a_slot_given_back_is_seen_by_the_next_open_on_the_other_process(
    own_nats: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A refusal's grace far longer than the test: only hearing the write can end it.
    monkeypatch.setattr("switchboard.limits.slots.FULL_GRACE", 600.0)
    async with two_processes(own_nats.client_url) as (a, b):
        await fill_one(a, b)
        a.close_stream("ws_a")

        async def b_opened() -> bool:
            return (await b.open_stream("ws_a")).allowed

        assert await eventually(b_opened, within=5)
        assert not await b_opened()


async def test_a_read_that_a_write_overtook_is_not_kept_as_no_room(
    own_nats: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("switchboard.limits.slots.FULL_GRACE", 600.0)
    async with two_processes(own_nats.client_url) as (a, b):
        assert await open_many(a, LIMIT) == LIMIT
        real_get = b.slots.kv.get

        async def overtaken_get(key: str) -> KeyValue.Entry:
            entry = await real_get(key)  # every slot held
            a.close_stream("ws_a")  # and meanwhile A gives one back, and B hears it
            await eventually(lambda: b.slots._changes.get("ws_a", 0) > 0)
            return entry

        b.slots.kv.get = overtaken_get  # type: ignore[method-assign,assignment]
        assert not (await b.open_stream("ws_a")).allowed  # what that read said
        b.slots.kv.get = real_get  # type: ignore[method-assign]
        assert (await b.open_stream("ws_a")).allowed  # read again, not taken as still full


async def test_spare_slots_on_one_process_never_keep_a_stream_out_on_the_other(
    own_nats: EmbeddedNats,
) -> None:
    async with two_processes(own_nats.client_url) as (a, b):
        assert await open_many(a, 1) == 1
        assert a.slots.held["ws_a"] > a.slots.used["ws_a"]  # A holds spare slots
        # One at a time, B gets every slot A does not use: A gives its spares back.
        for _ in range(LIMIT - 1):
            assert (await b.open_stream("ws_a")).allowed
        assert await open_many(b, 1) == 0 and await open_many(a, 1) == 0


async def test_spares_used_since_they_were_written_are_owned_up_to_at_once(
    own_nats: EmbeddedNats,
) -> None:
    async with two_processes(own_nats.client_url) as (a, b):
        assert await open_many(a, 1) == 1
        taken = a.slots.held["ws_a"]
        assert taken > 1
        # A fills its spares without a write: the ledger still shows them spare.
        assert await open_many(a, taken - 1) == taken - 1
        assert a.slots.held["ws_a"] == taken
        # B asks for them, and A answers that it has none.
        assert await open_many(b, LIMIT) == LIMIT - taken
        entry = await b.slots.kv.get("ws_a")
        assert parse(entry.value)[a.book.replica].spare == 0


async def test_a_give_back_whose_write_lost_a_race_is_written_again(
    own_nats: EmbeddedNats,
) -> None:
    async with two_processes(own_nats.client_url) as (a, b):
        await fill_one(a, b)
        real_update = a.slots.kv.update
        lost = 0

        async def loses_once(key: str, value: bytes, last: int | None = None) -> int:
            nonlocal lost
            if not lost:
                lost += 1
                raise KeyWrongLastSequenceError()
            return await real_update(key, value, last=last)

        a.slots.kv.update = loses_once  # type: ignore[method-assign,assignment]
        a.close_stream("ws_a")

        async def b_opened() -> bool:
            return (await b.open_stream("ws_a")).allowed

        assert await eventually(b_opened, within=5)
        assert lost == 1


async def test_a_short_mark_nobody_answers_delays_one_open_not_every_one(
    own_nats: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with two_processes(own_nats.client_url) as (a, b):
        assert await open_many(a, 1) == 1
        spare = a.slots.held["ws_a"] - 1
        assert spare > 0
        monkeypatch.setattr(a.slots, "_give_spares", lambda _workspace_id: None)  # stuck
        monkeypatch.setattr("switchboard.limits.slots.FULL_GRACE", 0.0)  # every open reads
        monkeypatch.setattr("switchboard.limits.slots.SHORT_WAIT", 0.2)
        waits = 0
        real_wait = b.slots._wait_for_spares

        async def counted_wait(*args: Any) -> None:
            nonlocal waits
            waits += 1
            await real_wait(*args)

        monkeypatch.setattr(b.slots, "_wait_for_spares", counted_wait)
        opened = [(await b.open_stream("ws_a")).allowed for _ in range(LIMIT)]
        # Every slot A does not hold, and none of the spares it would not give back.
        assert sum(opened) == LIMIT - 1 - spare
        assert waits == 1
