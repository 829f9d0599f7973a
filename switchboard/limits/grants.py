"""Open-stream slots as grants: the pure rules (the shell is `limits/slots.py`).

Reports alone (`book.py`) bound the open-stream limit only by what the other processes admit
before their reports are heard, which grows when the machine is overloaded. Grants make the
bound exact. A workspace's ledger is one key-value entry naming, for each process, how many of
the workspace's slots it holds; a process admits a stream only into a slot it holds, and changes
its grant only by compare-and-set on the whole ledger. So the grants of all live processes never
sum past the limit, however late anything is heard, and neither do their open streams.

A grow asks for what the process needs (its open streams and the opens waiting) plus a little
slack, a share of what is still free, so that the next opens need no round trip; near the
limit the slack is nothing and every open is a compare-and-set. A process gives back what it
holds beyond its streams and the slack it may keep, so that a freed slot can be taken by
another process. Grants of a process that has stopped beating (`STALE_AFTER` without a
heartbeat or a write of its own) are dropped by the next writer: its streams are gone with it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson

# Slack is at most this many slots, and at most 1/(SHARE x processes) of what is free, so the
# processes' slack together never takes more than a fraction of the room that is left.
MAX_SLACK = 16
SHARE = 4


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
    slack: int  # of which slack (beyond `need`)


def plan(
    ledger: Ledger,
    me: str,
    need: int,
    limit: int,
    now: float,
    alive: Callable[[str, float], bool],
) -> Plan:
    """The ledger once this process holds what it needs (as much of `need` as fits) plus its
    slack. Grants of processes that are not alive are dropped; `alive(replica, at)` is given
    the time of the replica's own last write."""
    others = {r: g for r, g in ledger.items() if r != me and g.slots > 0 and alive(r, g.at)}
    room = max(0, limit - sum(g.slots for g in others.values()))
    needed = min(max(0, need), room)
    slack = min(MAX_SLACK, (room - needed) // (SHARE * (len(others) + 1)))
    slots = needed + slack
    new = dict(others)
    if slots:
        new[me] = Grant(slots, now)
    return Plan(new, slots, slack)


def surplus(held: int, trimmed: Plan) -> bool:
    """Whether a process holding `held` slots should give some back, `trimmed` being its plan
    for the streams it has now: when it holds more than twice the slack it may keep (so that
    one close far from the limit writes nothing), or any surplus at all once no slack is left
    (near the limit, a freed slot must be free for every process)."""
    extra = held - trimmed.slots
    return extra > 0 and (trimmed.slack == 0 or extra > trimmed.slack)
