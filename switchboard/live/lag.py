"""How late this process's event loop runs: the signal for shedding audio under overload.

Audio is the one thing a stream may lose without breaking a promise (SPEC 5.3: best effort,
never stored), and it is the bulk of the work when calls are listened to: fifty frames a second
per listener. When the loop falls behind, events wait behind whatever else it has to do, so
while it is late the hub stops fanning audio out (counted), and events get the loop back."""

from __future__ import annotations

import asyncio

INTERVAL = 0.02  # seconds between samples
SHED_ABOVE = 0.05  # samples this late, SUSTAINED times in a row, start shedding
SUSTAINED = 3  # so a one-off stall (a collection, a start-up step) sheds nothing
RESUME_BELOW = 0.01  # a sample this punctual ends it
# Sampling runs only while someone asks: fifty wake-ups a second cost an idle process more than
# anything else it does, and only audio, which is rare, needs the answer. Unasked this long,
# the sampler stops; the next question starts it again, punctual until shown otherwise.
IDLE_AFTER = 5.0


class LoopLag:
    def __init__(self, idle_after: float = IDLE_AFTER) -> None:
        self.idle_after = idle_after
        self.latest = 0.0
        self.late_in_a_row = 0
        self._lagging = False
        self._enabled = False
        self._asked_at = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    @property
    def lagging(self) -> bool:
        if self._enabled:
            loop = asyncio.get_running_loop()
            self._asked_at = loop.time()
            if self._handle is None:
                self._begin(loop)
        return self._lagging

    @lagging.setter
    def lagging(self, value: bool) -> None:
        self._lagging = value  # for a test that holds the verdict (after `stop()`)

    @property
    def sampling(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        """Lets the sampler run whenever `lagging` is asked (not before: see IDLE_AFTER)."""
        self._enabled = True

    def _begin(self, loop: asyncio.AbstractEventLoop) -> None:
        self._lagging, self.late_in_a_row = False, 0
        self._due = loop.time() + INTERVAL
        self._handle = loop.call_at(self._due, self._sample, loop)

    def _sample(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        if now - self._asked_at > self.idle_after:
            self._handle = None
            return
        self.latest = now - self._due
        self.late_in_a_row = self.late_in_a_row + 1 if self.latest > SHED_ABOVE else 0
        self._lagging = self.observe(self._lagging, self.latest, self.late_in_a_row)
        self._due = now + INTERVAL
        self._handle = loop.call_at(self._due, self._sample, loop)

    @staticmethod
    def observe(lagging: bool, late: float, late_in_a_row: int) -> bool:
        """The next state from one sample and how many in a row were late (pure): a sustained
        lag starts shedding, a punctual sample ends it (hysteresis, so it does not flap)."""
        return late_in_a_row >= SUSTAINED or (lagging and late >= RESUME_BELOW)

    def stop(self) -> None:
        self._enabled = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
