"""Per-workspace quotas counted across every replica and worker (SPEC 6, "Limits"): the pure
bookkeeping. Each process counts what it admits itself and learns the others' counts from the
reports they publish; a decision is local (no round trip on the request path) and sees the
others as of their last report, so the limit can be passed by what the other processes admit
between two reports (see `SharedLimits` for how short that is).

Requests are counted in fixed windows of a wall-clock minute (like GitHub's API, so `Reset` is
the same instant for every client and every replica); a refused request is not counted, so a
client that backs off for `Retry-After` is served again at the next window. Streams are counted
while they are open; a process's count is trusted only while it keeps reporting it, so the
streams of a process that died stop counting after `STALE_AFTER` seconds."""

from __future__ import annotations

from dataclasses import dataclass, field

WINDOW_SECONDS = 60
# A process re-reports its open streams this often, and a count not re-reported for
# STALE_AFTER seconds is dropped (its process is gone).
REFRESH_SECONDS = 10.0
STALE_AFTER = 3 * REFRESH_SECONDS
# Retry-After for a refused stream: streams end at their own pace, not at a window's end.
STREAM_RETRY_SECONDS = 5

REQUESTS = "r"
STREAMS = "s"


@dataclass(frozen=True)
class Verdict:
    """One admission decision, with what the X-RateLimit headers say."""

    allowed: bool
    limit: int
    remaining: int
    reset: int  # seconds until the count falls (the window's end; for streams, a retry hint)

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
    left = (window_of(now) + 1) * WINDOW_SECONDS - now
    return max(1, int(left + 0.999))


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
    _own_requests: dict[str, tuple[int, int]] = field(default_factory=dict)  # ws -> (window, n)
    _peer_requests: dict[tuple[str, int], dict[str, int]] = field(default_factory=dict)
    _own_streams: dict[str, int] = field(default_factory=dict)
    _peer_streams: dict[str, dict[str, _PeerStreams]] = field(default_factory=dict)
    _unreported: set[tuple[str, str]] = field(default_factory=set)  # (kind, ws)

    # --- decisions ------------------------------------------------------------------------

    def admit_request(self, workspace_id: str, now: float) -> Verdict:
        window = window_of(now)
        mine = self._own_in(workspace_id, window)
        used = self.requests_used(workspace_id, now)
        reset = seconds_to_reset(now)
        if used >= self.rate_per_minute:
            return Verdict(False, self.rate_per_minute, 0, reset)
        self._own_requests[workspace_id] = (window, mine + 1)
        self._unreported.add((REQUESTS, workspace_id))
        return Verdict(True, self.rate_per_minute, self.rate_per_minute - used - 1, reset)

    def requests_used(self, workspace_id: str, now: float) -> int:
        """The workspace's requests in this window, as far as this process knows: its own and
        what the others last reported."""
        window = window_of(now)
        peers = self._peer_requests.get((workspace_id, window))
        return self._own_in(workspace_id, window) + (sum(peers.values()) if peers else 0)

    def _own_in(self, workspace_id: str, window: int) -> int:
        own = self._own_requests.get(workspace_id)
        return own[1] if own is not None and own[0] == window else 0

    def open_stream(self, workspace_id: str, now: float) -> Verdict:
        mine = self._own_streams.get(workspace_id, 0)
        used = mine + self._peer_stream_count(workspace_id, now)
        if used >= self.max_streams:
            return Verdict(False, self.max_streams, 0, STREAM_RETRY_SECONDS)
        self._own_streams[workspace_id] = mine + 1
        self._unreported.add((STREAMS, workspace_id))
        return Verdict(True, self.max_streams, self.max_streams - used - 1, STREAM_RETRY_SECONDS)

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

    def apply(self, key: str, value: bytes, now: float) -> None:
        """A report from any process (this one's own are ignored); malformed ones are dropped:
        the bucket is ours, but a bad entry must not stop the limits working."""
        parts = key.split(".")
        try:
            if parts[0] == REQUESTS and len(parts) == 4:
                window, workspace_id, replica = int(parts[1]), parts[2], parts[3]
                if replica == self.replica or window < window_of(now):
                    return
                self._peer_requests.setdefault((workspace_id, window), {})[replica] = int(value)
            elif parts[0] == STREAMS and len(parts) == 3:
                workspace_id, replica = parts[1], parts[2]
                if replica == self.replica:
                    return
                count_text, _, at_text = value.decode().partition(" ")
                peers = self._peer_streams.setdefault(workspace_id, {})
                peers[replica] = _PeerStreams(int(count_text), float(at_text))
        except (ValueError, UnicodeDecodeError):
            return

    def prune(self, now: float) -> None:
        """Forgets windows that are over and stream counts that went stale."""
        current = window_of(now)
        for key in [k for k in self._peer_requests if k[1] < current]:
            del self._peer_requests[key]
        for workspace_id in [w for w, (win, _) in self._own_requests.items() if win < current]:
            del self._own_requests[workspace_id]
        fresh = now - STALE_AFTER
        for workspace_id, peers in list(self._peer_streams.items()):
            for replica in [r for r, p in peers.items() if p.reported_at < fresh or not p.count]:
                del peers[replica]
            if not peers:
                del self._peer_streams[workspace_id]
