"""Open-stream slots as grants: the pure rules (the shell is `limits/slots.py`).

Reports alone (`book.py`) bound the open-stream limit only by what the other processes admit
before their reports are heard, which grows when the machine is overloaded. Grants make the
bound exact. A workspace's ledger is one key-value entry naming, for each process, how many of
the workspace's slots it holds; a process admits a stream only into a slot it holds, and changes
its grant only by compare-and-set on the whole ledger. So the grants of all live processes never
sum past the limit, however late anything is heard, and neither do their open streams.

A process holds what its streams need and nothing more: a grow asks for its open streams and
the opens waiting (one write covers every open that waits on it), and a process gives back
what a closed stream held. Spare slots held "for the next open" were tried and dropped: a
process whose spare slots were not needed kept them from another process that was at the
limit, so fewer streams than the limit could be open (984 of 1,000 in a storm on two
processes), until a stream closed. Grants of a process that has stopped beating
(`STALE_AFTER` without a heartbeat or a write of its own) are dropped by the next writer: its
streams are gone with it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson


@dataclass(frozen=True)
class Grant:
    slots: int
    at: float  # when its holder last wrote it (wall clock): a sign of life


Ledger = dict[str, Grant]


def parse(value: bytes | None) -> Ledger:
    """A ledger as stored; a malformed one reads as empty (the bucket is ours; a bad entry must
    not stop streams, and the next write replaces it)."""
    if not value:
        return {}
    try:
        raw = orjson.loads(value)
        return {
            str(replica): Grant(int(slots), float(at))
            for replica, (slots, at) in raw.items()
            if int(slots) > 0
        }
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return {}


def encode(ledger: Ledger) -> bytes:
    return orjson.dumps({r: [g.slots, round(g.at, 3)] for r, g in sorted(ledger.items())})


@dataclass(frozen=True)
class Plan:
    ledger: Ledger  # what to write
    slots: int  # this process's grant in it


def plan(
    ledger: Ledger,
    me: str,
    need: int,
    limit: int,
    now: float,
    alive: Callable[[str, float], bool],
) -> Plan:
    """The ledger once this process holds what it needs, as much of `need` as fits. Grants of
    processes that are not alive are dropped; `alive(replica, at)` is given the time of the
    replica's own last write."""
    others = {r: g for r, g in ledger.items() if r != me and g.slots > 0 and alive(r, g.at)}
    room = max(0, limit - sum(g.slots for g in others.values()))
    slots = min(max(0, need), room)
    new = dict(others)
    if slots:
        new[me] = Grant(slots, now)
    return Plan(new, slots)
