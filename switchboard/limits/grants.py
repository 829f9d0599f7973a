"""Open-stream slots as grants: the pure rules (the shell is `limits/slots.py`).

Reports alone (`book.py`) bound the open-stream limit only by what the other processes admit
before their reports are heard, which grows when the machine is overloaded. Grants make the
bound exact. A workspace's ledger is one key-value entry naming, for each process, how many of
the workspace's slots it holds; a process admits a stream only into a slot it holds, and changes
its grant only by compare-and-set on the whole ledger. So the grants of all live processes never
sum past the limit, however late anything is heard, and neither do their open streams.

A grow asks for the process's open streams and the opens waiting (one write covers every open
that waits on it), plus as many again as spare slots, up to `SPARE_MAX` and at most half of
what is left: so an open storm
writes the ledger a few dozen times rather than once every few opens (each write holds the
opens behind it, and what they hold raised a gateway's memory by a fifth). Spare slots must
never keep a stream out, so each grant also says how many of its slots were busy when written,
and a process that needs more than is free while others hold spares marks its grant `short`.
The others give their spares back as soon as they hear that (every process hears every write),
and take none while a fresh `short` mark stands; the short process waits for that write, once,
then decides on a ledger read after it. A process gives back what a closed stream held.
Grants of a process that has stopped beating (`STALE_AFTER` without a heartbeat or a write of
its own) are dropped by the next writer: its streams are gone with it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson

# A grow takes at most this many spare slots beyond what its opens need (as many as they need,
# below it): 128 brought a 5,000-stream storm's gateway memory back to what it was without grants.
SPARE_MAX = 128
# Seconds a `short` mark keeps the others from taking spare slots; a mark left by a process that
# has since had no reason to write again does not stop them for ever.
SHORT_FRESH = 5.0


@dataclass(frozen=True)
class Grant:
    slots: int
    at: float  # when its holder last wrote it (wall clock): a sign of life
    busy: int | None = None  # slots its streams (open or opening) took when written; None: all
    short: bool = False  # its holder needs slots the others hold as spares: give them back

    @property
    def spare(self) -> int:
        """Slots the holder did not need when it wrote (it may have used some since)."""
        return 0 if self.busy is None else max(0, self.slots - self.busy)

    def short_at(self, now: float) -> bool:
        return self.short and now - self.at < SHORT_FRESH


Ledger = dict[str, Grant]


def parse(value: bytes | None) -> Ledger:
    """A ledger as stored; a malformed one reads as empty (the bucket is ours; a bad entry must
    not stop streams, and the next write replaces it)."""
    if not value:
        return {}
    try:
        raw = orjson.loads(value)
        ledger: Ledger = {}
        for replica, fields in raw.items():
            # `[slots, at]` as first written (every slot busy), or `[slots, at, busy, short]`.
            slots, at, *rest = fields
            busy = int(rest[0]) if rest else None
            short = bool(rest[1]) if len(rest) > 1 else False
            ledger[str(replica)] = Grant(int(slots), float(at), busy, short)
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return {}
    return {replica: g for replica, g in ledger.items() if g.slots > 0 or g.short}


def encode(ledger: Ledger) -> bytes:
    return orjson.dumps(
        {
            r: [g.slots, round(g.at, 3), g.slots if g.busy is None else g.busy, int(g.short)]
            for r, g in sorted(ledger.items())
        }
    )


def others_spare(ledger: Ledger, me: str) -> int:
    """Spare slots the other processes held when they last wrote."""
    return sum(g.spare for r, g in ledger.items() if r != me)


@dataclass(frozen=True)
class Plan:
    ledger: Ledger  # what to write
    slots: int  # this process's grant in it
    short: bool  # less than `need` fits, and others hold spare slots: ask for them


def plan(
    ledger: Ledger,
    me: str,
    need: int,
    limit: int,
    now: float,
    alive: Callable[[str, float], bool],
    *,
    spare: int = 0,
    may_ask: bool = True,
) -> Plan:
    """The ledger once this process holds what it needs, as much of `need` as fits, plus up to
    `spare` more unless another process is short. Marked short (when `may_ask`) if `need` does
    not fit while the others hold spares. Grants of processes that are not alive are dropped;
    `alive(replica, at)` is given the time of the replica's own last write."""
    others = {
        r: g
        for r, g in ledger.items()
        if r != me and (g.slots > 0 or g.short_at(now)) and alive(r, g.at)
    }
    room = max(0, limit - sum(g.slots for g in others.values()))
    need = max(0, need)
    someone_short = any(g.short_at(now) for g in others.values())
    # Spares take at most half of what is left: near the limit they shrink to nothing, so the
    # last slots go to the processes whose streams need them, without asking.
    extra = 0 if someone_short else min(max(0, spare), max(0, room - need) // 2)
    slots = min(need, room) + extra
    short = may_ask and slots < need and others_spare(others, me) > 0
    new = dict(others)
    if slots or short:
        new[me] = Grant(slots, now, min(need, slots), short)
    return Plan(new, slots, short)
