"""The burst allowance of each workspace: a token bucket that every process keeps for the
requests of all processes together, so that the minute's quota cannot be spent in a few
seconds (SPEC 6, "Limits"; docs/decisions.md, issue 13).

A bucket holds at most `capacity` tokens and gains `rate` a second; every admitted request
spends one, wherever it was admitted. This process's own requests are spent as they are
admitted, the others' as their reports arrive, which may take the level below zero: requests
another process admitted before this one heard of them are a debt, paid back out of the next
tokens, so over any stretch longer than a report interval the workspace's pace is the bucket's
however many processes serve it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Level:
    tokens: float
    at: float


class BurstAllowance:
    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        # A workspace with no entry has a full bucket: most never spend enough to need one.
        self._levels: dict[str, _Level] = {}

    def tokens(self, workspace_id: str, now: float) -> float:
        level = self._levels.get(workspace_id)
        if level is None:
            return self.capacity
        # A wall clock that went backwards adds nothing instead of taking tokens away.
        elapsed = max(0.0, now - level.at)
        return min(self.capacity, level.tokens + elapsed * self.rate)

    def spend(self, workspace_id: str, count: int, now: float) -> None:
        # A debt deeper than the bucket itself comes only from a bus outage (each process
        # counted alone, and their counts arrive at once): paying it all back would refuse the
        # workspace for longer than its burst is worth, and the minute's count already holds
        # it to the quota.
        tokens = max(-self.capacity, self.tokens(workspace_id, now) - count)
        self._levels[workspace_id] = _Level(tokens, now)

    def seconds_until(self, tokens: float, level: float) -> float:
        """Seconds a bucket now at `tokens` takes to reach `level` (0 if it is there)."""
        return max(0.0, (level - tokens) / self.rate)

    def prune(self, now: float) -> None:
        """Forgets the buckets that are full again."""
        for workspace_id in [w for w in self._levels if self.tokens(w, now) >= self.capacity]:
            del self._levels[workspace_id]
