"""The shell around the grant rules (`grants.py`): each workspace's ledger in a key-value
bucket, written only by compare-and-set, and this process's open streams counted against what
it holds.

An open takes a slot this process already holds without waiting (a spare one, one a closed
stream freed and not yet given back, or one that a write for several waiting opens took);
otherwise it writes the ledger, and the opens that wait on that write are all covered by the
next one. A write that loses a race re-reads the ledger and tries again; a refusal is decided
only on a ledger just read. An open that finds the others holding spare slots marks this
process short and waits (once, at most `SHORT_WAIT`) for them to give those back; a process
that hears another marked short gives back its own spares at once (`changed`).

When the ledger cannot be written (the bus is down or too slow), `take` says so and the caller
decides from the reports alone, as every process did before grants (see `SharedLimits`): a bus
outage must not stop streams, and the bound then is the reports'.

This process's grant is trusted only while its own heartbeat, or its last write of that grant,
is recent: a process that could do neither for `TRUST_SECONDS` may have been taken for dead and
its grants dropped, so it takes its next slot through the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from switchboard.limits.grants import (
    SHORT_FRESH,
    SPARE_MAX,
    Ledger,
    Plan,
    encode,
    others_spare,
    parse,
    plan,
)
from switchboard.stopping import cancel_and_wait

log = logging.getLogger(__name__)

# Compare-and-set attempts before an open gives up on the ledger (then the reports decide).
ATTEMPTS = 8
# Seconds one ledger read or write may take before the reports decide instead.
LEDGER_TIMEOUT = 2.0
# Seconds a write of this process's own grant keeps it alive in the others' eyes, with room to
# spare (they drop a grant after book.STALE_AFTER without a sign of life).
TRUST_SECONDS = 15.0
# After the ledger failed to answer, opens go straight to the reports for this long, so that a
# bus outage costs each open nothing rather than a timeout each.
OUTAGE_SECONDS = 5.0
# An open is refused without a read of its own when a read begun at most this long before it
# arrived found no room and no write to the ledger has been heard since (`changed`): a flood
# of opens over the limit costs the bus a read a second, not one per open, and a slot given
# back is seen by the next open, however soon.
FULL_GRACE = 1.0
# Seconds an open that marked this process short waits for the others to give spare slots back
# (a write each, milliseconds on a live process, longer on one whose loop lags under load);
# then the ledger as read decides. As long as the ledger itself may take to answer.
SHORT_WAIT = LEDGER_TIMEOUT


class LedgerUnavailable(Exception):
    """The ledger could not be read or written in time."""


class StreamSlots:
    def __init__(
        self,
        kv: KeyValue,
        *,
        replica: str,
        limit: int,
        clock: Callable[[], float],
        alive: Callable[[str, float], bool],
        trusted: Callable[[], bool],
    ) -> None:
        self.kv = kv
        self.replica = replica
        self.limit = limit
        self.clock = clock
        self.alive = alive  # whether another replica still beats (wall clock of its last write)
        self.trusted = trusted  # whether this process's own heartbeat is recent
        # Slots taken by this process's streams. The same number as the book's own streams
        # once an admission is done, but counted here, in the same step as the check that a
        # slot is free: deriving it from the book would make exactness depend on no await ever
        # coming between `take` and the book's count.
        self.used: dict[str, int] = {}
        self.held: dict[str, int] = {}  # the slots its grants give it
        self._waiting: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # The ledger as last read or written, with its revision (0: none stored yet).
        self._known: dict[str, tuple[Ledger, int]] = {}
        self._to_trim: set[str] = set()
        self._written: dict[str, float] = {}  # wall clock of this process's last write
        self._failed_at = -OUTAGE_SECONDS  # wall clock of the ledger's last failure
        # Wall clock at which the last read that found a workspace's slots all held began.
        self._full: dict[str, float] = {}
        # Ledger writes heard, per workspace this process is busy with: a read that a write
        # overtook cannot stand as "no room" (the write may have given some back).
        self._changes: dict[str, int] = {}
        # Per workspace this process is short in: the others' spare slots when it asked, and
        # what its open waits on (a write that leaves them fewer).
        self._asking: dict[str, tuple[int, asyncio.Future[None]]] = {}
        self._giving: dict[str, asyncio.Task[None]] = {}  # spares being given back
        self._unanswered_at: dict[str, float] = {}  # when a wait for spares last timed out

    async def take(self, workspace_id: str) -> bool:
        """Takes a slot for one more stream: True when it is this process's, False when every
        slot is held (the workspace is at its limit). Raises LedgerUnavailable when the ledger
        cannot say."""
        if self._free(workspace_id):
            self._count(workspace_id)
            return True
        arrived = self.clock()
        if self._found_full(workspace_id, arrived):
            return False
        self._waiting[workspace_id] = self._waiting.get(workspace_id, 0) + 1
        try:
            async with self._lock(workspace_id):
                if not self._free(workspace_id):
                    if self._found_full(workspace_id, arrived):
                        return False  # a read begun since this open arrived found no room
                    if self.clock() - self._failed_at < OUTAGE_SECONDS:
                        raise LedgerUnavailable("it failed to answer moments ago")
                    need = self.used.get(workspace_id, 0) + self._waiting[workspace_id]
                    await self._settle(workspace_id, need, growing=True)
                if not self._free(workspace_id):
                    return False
                self._count(workspace_id)
                return True
        finally:
            left = self._waiting[workspace_id] - 1
            if left:
                self._waiting[workspace_id] = left
            else:
                del self._waiting[workspace_id]
                self._forget_if_idle(workspace_id)

    def changed(self, workspace_id: str, value: bytes = b"") -> None:
        """Some process wrote the workspace's ledger (heard on the bus, `value` as written):
        room may have been given back, so the next open that finds none reads the ledger again.
        A process marked short is given this one's spare slots."""
        self._full.pop(workspace_id, None)
        if workspace_id in self._locks:
            self._changes[workspace_id] = self._changes.get(workspace_id, 0) + 1
        asking = self._asking.get(workspace_id)
        if asking is None and workspace_id not in self.held:
            return
        heard = parse(value)
        spares = others_spare(heard, self.replica)
        if asking is not None and spares < asking[0] and not asking[1].done():
            asking[1].set_result(None)
        mine = heard.get(self.replica)
        now = self.clock()
        if (
            mine is not None
            and mine.spare
            and any(g.short_at(now) for r, g in heard.items() if r != self.replica)
        ):
            self._give_spares(workspace_id)

    def _give_spares(self, workspace_id: str) -> None:
        if workspace_id in self._giving:
            return

        async def give() -> None:
            try:
                with contextlib.suppress(LedgerUnavailable):
                    async with self._lock(workspace_id):
                        used = self.used.get(workspace_id, 0)
                        await self._settle(workspace_id, used, announce=True)
            finally:
                del self._giving[workspace_id]
                self._forget_if_idle(workspace_id)

        self._giving[workspace_id] = asyncio.get_running_loop().create_task(give())

    def count_untaken(self, workspace_id: str) -> None:
        """A stream admitted without a slot (the ledger was unavailable): counted, so that the
        next write covers it."""
        self._count(workspace_id)

    def _count(self, workspace_id: str) -> None:
        self.used[workspace_id] = self.used.get(workspace_id, 0) + 1

    def give_back(self, workspace_id: str) -> None:
        """A stream ended; what it held is returned by the next `trim` if not needed."""
        left = self.used.get(workspace_id, 0) - 1
        if left > 0:
            self.used[workspace_id] = left
        else:
            self.used.pop(workspace_id, None)
        self._to_trim.add(workspace_id)

    async def trim(self) -> None:
        """Gives back what this process holds beyond its open streams."""
        now = self.clock()
        self._full = {w: at for w, at in self._full.items() if self._found_full(w, now)}
        while self._to_trim:
            workspace_id = self._to_trim.pop()
            with contextlib.suppress(LedgerUnavailable):
                async with self._lock(workspace_id):
                    await self._settle(workspace_id, self.used.get(workspace_id, 0))
            self._forget_if_idle(workspace_id)

    def _forget_if_idle(self, workspace_id: str) -> None:
        """A workspace this process holds nothing for costs it nothing."""
        busy = workspace_id in self.used or workspace_id in self.held
        lock = self._locks.get(workspace_id)
        if not busy and workspace_id not in self._waiting and not (lock and lock.locked()):
            self._locks.pop(workspace_id, None)
            self._changes.pop(workspace_id, None)
            self._known.pop(workspace_id, None)
            self._written.pop(workspace_id, None)
            self._unanswered_at.pop(workspace_id, None)
            # A recent "no room" stays: it is what spares the bus a read per refused open.
            if not self._found_full(workspace_id, self.clock()):
                self._full.pop(workspace_id, None)

    async def release_all(self) -> None:
        """At shutdown (after the drain): this process holds nothing any more. If the ledger
        does not answer, the rest is left to expire with this process's heartbeat rather than
        each workspace waiting out its own timeout."""
        await cancel_and_wait(list(self._giving.values()))
        self.used.clear()
        for workspace_id in list(self.held):
            try:
                async with self._lock(workspace_id):
                    await self._settle(workspace_id, 0)
            except LedgerUnavailable:
                return

    def _unanswered(self, workspace_id: str) -> bool:
        """Whether a wait for spares timed out within `SHORT_FRESH` (the entry goes when the
        workspace is forgotten)."""
        at = self._unanswered_at.get(workspace_id, -SHORT_FRESH)
        return self.clock() - at < SHORT_FRESH

    def _found_full(self, workspace_id: str, arrived: float) -> bool:
        return self._full.get(workspace_id, -FULL_GRACE) >= arrived - FULL_GRACE

    def _free(self, workspace_id: str) -> bool:
        held = self.held.get(workspace_id, 0)
        return self.used.get(workspace_id, 0) < held and self._trusted(workspace_id)

    def _trusted(self, workspace_id: str) -> bool:
        """Whether the others still count this process's grant (it beat, or wrote it, lately)."""
        written = self._written.get(workspace_id)
        recent = written is not None and self.clock() - written < TRUST_SECONDS
        return recent or self.trusted()

    def _lock(self, workspace_id: str) -> asyncio.Lock:
        lock = self._locks.get(workspace_id)
        if lock is None:
            lock = self._locks[workspace_id] = asyncio.Lock()
        return lock

    async def _settle(
        self, workspace_id: str, need: int, *, growing: bool = False, announce: bool = False
    ) -> None:
        """Writes this process's grant for `need` streams (a grow, with spare slots; or a trim
        when `growing` is False and it holds more than it may keep, or when `announce` and the
        ledger still shows it spare slots). Holds the workspace's lock."""
        fresh = asked = False
        read_at, changes = 0.0, 0
        for _attempt in range(ATTEMPTS):
            if workspace_id not in self._known:
                read_at, changes = self.clock(), self._changes.get(workspace_id, 0)
                self._known[workspace_id] = await self._read(workspace_id)
                fresh = True
            ledger, revision = self._known[workspace_id]
            now = self.clock()
            target = plan(
                ledger,
                self.replica,
                need,
                self.limit,
                now,
                self.alive,
                spare=min(SPARE_MAX, need) if growing else 0,
                may_ask=growing and not asked and not self._unanswered(workspace_id),
            )
            held = self.held.get(workspace_id, 0)
            trusted = self._trusted(workspace_id)  # if not, write even an unchanged grant
            mine = ledger.get(self.replica)
            if target.short and not fresh:
                del self._known[workspace_id]  # ask the others only on a ledger just read
                continue
            if target.short:
                marked = mine is not None and mine.short_at(now) and target.slots <= held
                # Listening before the write: the others may answer it at once.
                spares = others_spare(ledger, self.replica)
                hint = self._listen_for_spares(workspace_id, spares)
                try:
                    if not marked:
                        await self._write_grant(workspace_id, target, revision, now)
                        if workspace_id not in self._known:
                            continue  # another process wrote first: read it again
                    asked = True
                    await self._wait_for_spares(workspace_id, spares, hint)
                finally:
                    self._asking.pop(workspace_id, None)
                continue  # decide on the ledger as read after their answer
            if growing and target.slots <= held and trusted:
                if not fresh:
                    # What was known says there is no room; others may have given some back.
                    del self._known[workspace_id]
                    continue
                if self._changes.get(workspace_id, 0) == changes:
                    self._full[workspace_id] = read_at  # no write was heard during the read
                return  # no room, on a ledger just read
            # What the ledger says this process holds: more than `held` after a give-back
            # whose write lost a race (`held` drops before the write).
            written = 0 if mine is None else mine.slots
            stale_spares = announce and mine is not None and mine.spare > 0
            kept = target.slots >= max(held, written)
            if not growing and kept and trusted and not stale_spares:
                return  # nothing to give back
            await self._write_grant(workspace_id, target, revision, now)
            if workspace_id in self._known:
                return
            # Another process wrote first: read it again.
        raise LedgerUnavailable(f"the ledger of {workspace_id} changed {ATTEMPTS} times")

    def _listen_for_spares(self, workspace_id: str, spares: int) -> asyncio.Future[None]:
        """A future that a ledger write heard sets when it leaves the others fewer than
        `spares` spare slots (`changed`)."""
        hint: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._asking[workspace_id] = (spares, hint)
        return hint

    async def _wait_for_spares(
        self, workspace_id: str, spares: int, hint: asyncio.Future[None]
    ) -> None:
        """Waits, at most `SHORT_WAIT`, until a read shows the other processes holding fewer
        than `spares` spare slots, and leaves the last read as the ledger known. A write heard
        is only a hint: a compare-and-set that lost its race is heard too, though never stored."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHORT_WAIT
        self._known.pop(workspace_id, None)
        while (left := deadline - loop.time()) > 0:
            try:
                await asyncio.wait_for(hint, left)
            except TimeoutError:
                # Not answered (a process alive but stuck): the opens behind this one do not
                # each wait too; the reads decide until the mark is stale.
                self._unanswered_at[workspace_id] = self.clock()
                return
            self._known[workspace_id] = await self._read(workspace_id)
            if others_spare(self._known[workspace_id][0], self.replica) < spares:
                return
            del self._known[workspace_id]
            hint = self._listen_for_spares(workspace_id, spares)

    async def _write_grant(
        self, workspace_id: str, target: Plan, revision: int, now: float
    ) -> None:
        """Writes the planned ledger; on a lost race, forgets the ledger known (to read it)."""
        if target.slots < self.held.get(workspace_id, 0):
            # Giving back is safe at once; taking waits for the write.
            self.held[workspace_id] = target.slots
        try:
            revision = await self._write(workspace_id, target.ledger, revision)
        except KeyWrongLastSequenceError:
            del self._known[workspace_id]
            return
        self._known[workspace_id] = (target.ledger, revision)
        self._full.pop(workspace_id, None)
        self._written[workspace_id] = now
        self.held[workspace_id] = target.slots
        if not target.slots:
            self.held.pop(workspace_id, None)
            if not target.short:
                self._written.pop(workspace_id, None)

    async def _read(self, workspace_id: str) -> tuple[Ledger, int]:
        try:
            entry = await asyncio.wait_for(self.kv.get(workspace_id), LEDGER_TIMEOUT)
        except KeyNotFoundError as missing:
            # Deleted or never written; a delete marker's revision is what the next write
            # must name.
            marker = getattr(missing, "entry", None)
            return {}, getattr(marker, "revision", 0) or 0
        except (TimeoutError, NatsError) as failure:
            self._failed_at = self.clock()
            raise LedgerUnavailable(type(failure).__name__) from failure
        return parse(entry.value), entry.revision or 0

    async def _write(self, workspace_id: str, ledger: Ledger, revision: int) -> int:
        value = encode(ledger)
        try:
            if revision:
                write = self.kv.update(workspace_id, value, last=revision)
            else:
                write = self.kv.create(workspace_id, value)
            return await asyncio.wait_for(write, LEDGER_TIMEOUT)
        except KeyWrongLastSequenceError:
            raise
        except (TimeoutError, NatsError) as failure:
            self._known.pop(workspace_id, None)  # the write may or may not have landed
            self._failed_at = self.clock()
            raise LedgerUnavailable(type(failure).__name__) from failure
