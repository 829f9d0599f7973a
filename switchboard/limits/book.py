"""Per-workspace quotas counted across every replica and worker (SPEC 6, "Limits"): the pure
bookkeeping. Each process counts what it admits itself and learns the others' counts from the
reports they publish; a decision is local (no round trip on the request path) and sees the
others as of their last report, so the limit can be passed by what the other processes admit
between two reports (see `SharedLimits` for how short that is).

Requests are counted in fixed windows of a wall-clock minute (like GitHub's API, so every
replica agrees on when a window ends), and their pace within the minute is capped by a burst
allowance (`allowance.py`): a few seconds' worth of the minute's average rate at once, then that
rate. Without it the whole minute's quota could be spent in seconds, which is most of a small
server. A refused request is not counted anywhere, so a client that backs off for
`Retry-After` is served when that time is up. Streams are counted while they are open; a
process's count is trusted only while it keeps reporting it, so the streams of a process that
died stop counting after `STALE_AFTER` seconds.

The headers say what a client may do next, never more than is left: `X-RateLimit-Limit` is the
minute's quota (the stream limit for a refused stream), `X-RateLimit-Remaining` the requests
that would be admitted now back to back (the smaller of the minute's rest and the whole tokens
left), `X-RateLimit-Reset` the whole seconds (at least 1) until `Remaining` next grows, which on
a refusal is `Retry-After`: the minute's end when the minute is spent, else when the next
token is there."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from switchboard.limits.allowance import BurstAllowance

WINDOW_SECONDS = 60
# A process re-reports its open streams this often, and a count not re-reported for
# STALE_AFTER seconds is dropped (its process is gone).
REFRESH_SECONDS = 10.0
STALE_AFTER = 3 * REFRESH_SECONDS
# Retry-After for a refused stream: streams end at their own pace, not at a window's end.
STREAM_RETRY_SECONDS = 5

REQUESTS = "r"
STREAMS = "s"
HEARTBEAT = "h"  # a process says it is alive (its stream grants hold: limits/grants.py)

# Which limit a verdict is about (also the label of the refusals' metric).
MINUTE = "requests_per_minute"
BURST = "request_burst"
OPEN_STREAMS = "open_streams"


@dataclass(frozen=True)
class Verdict:
    """One admission decision, with what the X-RateLimit headers say."""

    allowed: bool
    limit: int
    remaining: int
    reset: int  # whole seconds until `remaining` grows (for streams, a retry hint)
    kind: str  # MINUTE, BURST or OPEN_STREAMS: the limit that set `remaining` and `reset`

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset),
        }


def window_of(now: float) -> int:
    return int(now // WINDOW_SECONDS)


def seconds_to_reset(now: float) -> int:
    """Whole seconds until the current window ends, at least 1 (a `Retry-After` of 0 would
    invite an immediate retry into the same full window)."""
    return whole_seconds((window_of(now) + 1) * WINDOW_SECONDS - now)


def whole_seconds(seconds: float) -> int:
    """Rounded up (a client that waits this long finds what it waited for), at least 1."""
    return max(1, math.ceil(seconds - 1e-9))


def burst_capacity(rate_per_minute: int, burst_seconds: float) -> int:
    """The requests a workspace may send at once: `burst_seconds` of the minute's average
    rate, at least one."""
    return max(1, int(rate_per_minute * burst_seconds / WINDOW_SECONDS))


def request_key(window: int, workspace_id: str, replica: str) -> str:
    return f"{REQUESTS}.{window}.{workspace_id}.{replica}"


def stream_key(workspace_id: str, replica: str) -> str:
    return f"{STREAMS}.{workspace_id}.{replica}"


@dataclass
class _PeerStreams:
    count: int
    reported_at: float


@dataclass
class LimitBook:
    """The counts one process knows. `replica` names this process in the reports; `now` is
    always wall-clock Unix seconds (windows must agree across machines)."""

    replica: str
    rate_per_minute: int
    max_streams: int
    burst_seconds: float
    _allowance: BurstAllowance = field(init=False)
    _own_requests: dict[str, tuple[int, int]] = field(default_factory=dict)  # ws -> (window, n)
    _peer_requests: dict[tuple[str, int], dict[str, int]] = field(default_factory=dict)
    _own_streams: dict[str, int] = field(default_factory=dict)
    _peer_streams: dict[str, dict[str, _PeerStreams]] = field(default_factory=dict)
    _unreported: set[tuple[str, str]] = field(default_factory=set)  # (kind, ws)
    # (ws, replica) -> (window, count): each peer's latest request report, so that a report
    # spends only the requests it adds to the one before.
    _peer_latest: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    _heartbeats: dict[str, float] = field(default_factory=dict)  # replica -> its time

    def __post_init__(self) -> None:
        capacity = burst_capacity(self.rate_per_minute, self.burst_seconds)
        self._allowance = BurstAllowance(self.rate_per_minute / WINDOW_SECONDS, capacity)

    @property
    def burst(self) -> int:
        return int(self._allowance.capacity)

    # --- decisions ------------------------------------------------------------------------

    def admit_request(self, workspace_id: str, now: float) -> Verdict:
        verdict = self.request_verdict(workspace_id, now)
        if verdict.allowed:
            self._count_request(workspace_id, now)
        return verdict

    def request_verdict(self, workspace_id: str, now: float) -> Verdict:
        """Whether one more request fits both limits, and the headers if it is admitted;
        changes nothing."""
        limit = self.rate_per_minute
        minute_left = limit - self.requests_used(workspace_id, now)
        tokens = self._allowance.tokens(workspace_id, now)
        to_token = self._allowance.seconds_until(tokens, 1.0)
        if minute_left <= 0:
            # The bucket may still be in debt when the minute ends: the later of the two.
            return Verdict(
                False, limit, 0, whole_seconds(max(seconds_to_reset(now), to_token)), MINUTE
            )
        if tokens < 1.0:
            return Verdict(False, limit, 0, whole_seconds(to_token), BURST)
        minute_left -= 1
        tokens -= 1.0
        whole_tokens = max(0, math.floor(tokens))
        if minute_left <= whole_tokens:  # more tokens arrive, but the minute allows no more
            return Verdict(True, limit, minute_left, seconds_to_reset(now), MINUTE)
        to_next = self._allowance.seconds_until(tokens, whole_tokens + 1)
        return Verdict(True, limit, whole_tokens, whole_seconds(to_next), BURST)

    def _count_request(self, workspace_id: str, now: float) -> None:
        window = window_of(now)
        self._own_requests[workspace_id] = (window, self._own_in(workspace_id, window) + 1)
        self._allowance.spend(workspace_id, 1, now)
        self._unreported.add((REQUESTS, workspace_id))

    def requests_used(self, workspace_id: str, now: float) -> int:
        """The workspace's requests in this window, as far as this process knows: its own and
        what the others last reported."""
        window = window_of(now)
        peers = self._peer_requests.get((workspace_id, window))
        return self._own_in(workspace_id, window) + (sum(peers.values()) if peers else 0)

    def _own_in(self, workspace_id: str, window: int) -> int:
        own = self._own_requests.get(workspace_id)
        return own[1] if own is not None and own[0] == window else 0

    def open_stream(self, workspace_id: str, now: float, *, slot_taken: bool = False) -> Verdict:
        """A stream's open is a request too: it needs room in both request limits and a stream
        slot, and is counted in neither unless it gets all three. `slot_taken`: the slot was
        granted through the ledger (limits/slots.py); else the reports decide."""
        request = self.request_verdict(workspace_id, now)
        if not request.allowed:
            return request
        mine = self._own_streams.get(workspace_id, 0)
        used = mine + self._peer_stream_count(workspace_id, now)
        limit = self.max_streams
        if used >= limit and not slot_taken:
            return self.streams_full()
        self._count_request(workspace_id, now)
        self._own_streams[workspace_id] = mine + 1
        self._unreported.add((STREAMS, workspace_id))
        return Verdict(True, limit, max(0, limit - used - 1), STREAM_RETRY_SECONDS, OPEN_STREAMS)

    def streams_full(self) -> Verdict:
        return Verdict(False, self.max_streams, 0, STREAM_RETRY_SECONDS, OPEN_STREAMS)

    def close_stream(self, workspace_id: str) -> None:
        left = self._own_streams.get(workspace_id, 0) - 1
        if left > 0:
            self._own_streams[workspace_id] = left
        else:
            self._own_streams.pop(workspace_id, None)
        self._unreported.add((STREAMS, workspace_id))

    def open_streams(self, workspace_id: str, now: float) -> int:
        """Every process's open streams of the workspace, as far as this one knows."""
        return self._own_streams.get(workspace_id, 0) + self._peer_stream_count(workspace_id, now)

    def _peer_stream_count(self, workspace_id: str, now: float) -> int:
        peers = self._peer_streams.get(workspace_id)
        if not peers:
            return 0
        fresh = now - STALE_AFTER
        return sum(p.count for p in peers.values() if p.reported_at >= fresh)

    # --- reports --------------------------------------------------------------------------

    def reports(self, now: float) -> list[tuple[str, bytes]]:
        """This process's changed counts since the last call, as (key, value) to publish."""
        out: list[tuple[str, bytes]] = []
        window = window_of(now)
        for kind, workspace_id in self._unreported:
            if kind == REQUESTS:
                own = self._own_requests.get(workspace_id)
                if own is not None and own[0] == window:
                    out.append((request_key(window, workspace_id, self.replica), b"%d" % own[1]))
            else:
                count = self._own_streams.get(workspace_id, 0)
                value = b"%d %.3f" % (count, now)
                out.append((stream_key(workspace_id, self.replica), value))
        self._unreported.clear()
        return out

    def heartbeat(self, now: float) -> tuple[str, bytes]:
        return f"{HEARTBEAT}.{self.replica}", b"%.3f" % now

    def alive(self, replica: str, at: float, now: float) -> bool:
        """Whether a process still counts: it beat, or wrote at `at`, within STALE_AFTER."""
        return max(at, self._heartbeats.get(replica, 0.0)) >= now - STALE_AFTER

    def refresh(self) -> None:
        """Marks every open-stream count for reporting again (they go stale unless repeated)."""
        self._unreported.update((STREAMS, ws) for ws in self._own_streams)

    def forget_streams(self) -> list[str]:
        """At shutdown: this process holds no stream any more; returns the workspaces to report
        as zero."""
        gone = list(self._own_streams)
        self._own_streams.clear()
        self._unreported.update((STREAMS, ws) for ws in gone)
        return gone

    def apply(self, key: str, value: bytes, now: float, *, loaded: bool = False) -> None:
        """A report from any process (this one's own are ignored); malformed ones are dropped:
        the bucket is ours, but a bad entry must not stop the limits working. A report `loaded`
        from the bucket at start counts in its minute but spends no burst allowance: when its
        requests were admitted is not known, and they are most likely long past."""
        parts = key.split(".")
        try:
            if parts[0] == REQUESTS and len(parts) == 4:
                window, workspace_id, replica = int(parts[1]), parts[2], parts[3]
                count = int(value)
                if replica == self.replica or count < 0:
                    return
                self._heard_requests(workspace_id, replica, window, count, now, spend=not loaded)
                if window < window_of(now):
                    return
                self._peer_requests.setdefault((workspace_id, window), {})[replica] = count
            elif parts[0] == STREAMS and len(parts) == 3:
                workspace_id, replica = parts[1], parts[2]
                if replica == self.replica:
                    return
                count_text, _, at_text = value.decode().partition(" ")
                peers = self._peer_streams.setdefault(workspace_id, {})
                peers[replica] = _PeerStreams(int(count_text), float(at_text))
            elif parts[0] == HEARTBEAT and len(parts) == 2 and parts[1] != self.replica:
                at = float(value)
                self._heartbeats[parts[1]] = max(at, self._heartbeats.get(parts[1], 0.0))
        except (ValueError, UnicodeDecodeError):
            return

    def _heard_requests(
        self, workspace_id: str, replica: str, window: int, count: int, now: float, *, spend: bool
    ) -> None:
        """Spends the requests a peer admitted since its previous report (a report is a count
        in its window, not an increment, and one may be heard twice)."""
        latest = self._peer_latest.get((workspace_id, replica))
        if latest is not None and window < latest[0]:
            return  # its window is over; the peer has reported from a later one already
        known = latest[1] if latest is not None and latest[0] == window else 0
        if latest is not None and count <= known:
            return
        # The first report heard from a peer for a window that is over says nothing of when
        # its requests came (most are long past): it is recorded, not spent.
        if spend and (latest is not None or window == window_of(now)):
            self._allowance.spend(workspace_id, count - known, now)
        self._peer_latest[(workspace_id, replica)] = (window, count)

    def prune(self, now: float) -> None:
        """Forgets windows that are over, full buckets and stream counts that went stale."""
        current = window_of(now)
        for key in [k for k in self._peer_requests if k[1] < current]:
            del self._peer_requests[key]
        for workspace_id in [w for w, (win, _) in self._own_requests.items() if win < current]:
            del self._own_requests[workspace_id]
        # A peer heard of in the last window may still send that window's final count.
        for peer in [p for p, (win, _) in self._peer_latest.items() if win < current - 1]:
            del self._peer_latest[peer]
        self._allowance.prune(now)
        fresh = now - STALE_AFTER
        for replica in [r for r, at in self._heartbeats.items() if at < fresh]:
            del self._heartbeats[replica]
        for workspace_id, peers in list(self._peer_streams.items()):
            for replica in [r for r, p in peers.items() if p.reported_at < fresh or not p.count]:
                del peers[replica]
            if not peers:
                del self._peer_streams[workspace_id]
