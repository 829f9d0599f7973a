"""Process metrics in the Prometheus text format. Labels are kinds and reasons from code, never
an id of a key, a token, a call or a workspace (that would leak and explode cardinality)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

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
