"""Process metrics in the Prometheus text format. Labels are kinds and reasons from code, never
an id of a key, a token, a call or a workspace (that would leak and explode cardinality)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

STREAM_KINDS = ("transcript_sse", "conversation_sse", "call_websocket", "events_sse")


class Metrics:
    def __init__(self) -> None:
        self.open_streams: dict[str, int] = defaultdict(int)
        self.frames_sent: dict[str, int] = defaultdict(int)
        self.frames_dropped: dict[str, int] = defaultdict(int)
        self.heartbeats: dict[str, int] = defaultdict(int)
        self.auth_failures: dict[str, int] = defaultdict(int)
        self.bus_messages = 0
        # Read at scrape time from the hub, so it can never drift from the truth.
        self.bus_subscriptions: Callable[[], int] = lambda: 0
        # Counter families that components register for themselves: name -> (help, label, values).
        self._families: dict[str, tuple[str, str, dict[str, int]]] = {}

    def counter(self, name: str, help_text: str, label: str) -> dict[str, int]:
        """A labelled counter family, registered once (a second call returns the same values):
        components increment `values[label_value]` and the family is rendered with the rest."""
        if name not in self._families:
            self._families[name] = (help_text, label, defaultdict(int))
        return self._families[name][2]

    def snapshot(self) -> dict[str, Any]:
        """Every value, as JSON-ready data: what a sibling process sends to the one that answers
        a scrape (see `merged`)."""
        return {
            "open_streams": dict(self.open_streams),
            "frames_sent": dict(self.frames_sent),
            "frames_dropped": dict(self.frames_dropped),
            "heartbeats": dict(self.heartbeats),
            "auth_failures": dict(self.auth_failures),
            "bus_messages": self.bus_messages,
            "bus_subscriptions": self.bus_subscriptions(),
            "families": {
                name: [help_text, label, dict(values)]
                for name, (help_text, label, values) in self._families.items()
            },
        }

    @classmethod
    def merged(cls, snapshots: list[dict[str, Any]]) -> Metrics:
        """The sum of several processes' snapshots (counters and gauges alike add up: open
        streams, subscriptions and totals are all per process)."""
        total = cls()
        subscriptions = 0
        for snap in snapshots:
            for name in ("open_streams", "frames_sent", "frames_dropped", "heartbeats"):
                _add(getattr(total, name), snap.get(name, {}))
            _add(total.auth_failures, snap.get("auth_failures", {}))
            total.bus_messages += int(snap.get("bus_messages", 0))
            subscriptions += int(snap.get("bus_subscriptions", 0))
            for name, (help_text, label, values) in snap.get("families", {}).items():
                _add(total.counter(name, help_text, label), values)
        total.bus_subscriptions = lambda: subscriptions
        return total

    def render(self) -> str:
        lines: list[str] = []

        def family(
            name: str, kind: str, help_text: str, values: dict[str, int], label: str
        ) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            keys = set(values) | (set(STREAM_KINDS) if label == "kind" else set())
            for key in sorted(keys):
                lines.append(f'{name}{{{label}="{key}"}} {values.get(key, 0)}')

        family("switchboard_open_streams", "gauge", "Streams open now.", self.open_streams, "kind")
        family(
            "switchboard_frames_sent_total",
            "counter",
            "Frames written to clients.",
            self.frames_sent,
            "kind",
        )
        family(
            "switchboard_frames_dropped_total",
            "counter",
            "Frames dropped because a client's buffer was full.",
            self.frames_dropped,
            "kind",
        )
        family(
            "switchboard_heartbeats_total",
            "counter",
            "SSE keep-alive comments written.",
            self.heartbeats,
            "kind",
        )
        family(
            "switchboard_auth_failures_total",
            "counter",
            "Refused credentials by reason.",
            self.auth_failures,
            "reason",
        )
        lines += [
            "# HELP switchboard_bus_subscriptions NATS subscriptions held by the hub.",
            "# TYPE switchboard_bus_subscriptions gauge",
            f"switchboard_bus_subscriptions {self.bus_subscriptions()}",
            "# HELP switchboard_bus_messages_total Messages the hub received from NATS.",
            "# TYPE switchboard_bus_messages_total counter",
            f"switchboard_bus_messages_total {self.bus_messages}",
        ]
        for name, (help_text, label, values) in sorted(self._families.items()):
            family(name, "counter", help_text, values, label)
        return "\n".join(lines) + "\n"


def _add(into: dict[str, int], values: dict[str, Any]) -> None:
    for key, value in values.items():
        into[key] += int(value)
