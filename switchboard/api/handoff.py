"""A stream's request that hands its connection over (issue 13, memory per stream).

A stream lives for hours, and while its ASGI call is running it keeps the whole call chain
alive: a task, a coroutine frame per middleware layer, the server's protocol objects, the scope
and its headers; at thousands of streams that was most of what a stream cost. So once a stream
is live its connection is taken over by a small protocol object of ours
(live/sse_connection.py, live/ws_connection.py) and the ASGI call returns. What the layers of
that call hold for the stream's life (an open-stream slot, hub subscriptions, the registry
entry, the access-log line) must then be released when the connection ends, not when the call
returns: each layer gives its release to the request's `Handoff`, which runs it at once if
the connection was not taken, or when the connection that took it ends."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

# The scope key of a request's handoff (made on first use; one per request).
HANDOFF = "switchboard.handoff"

# Releases that must await (unsubscribing from the bus) run as tasks, kept here until done:
# the loop itself holds only weak references to tasks.
_releasing: set[asyncio.Task[None]] = set()


class Handoff:
    __slots__ = ("_ended", "_releases", "taken")

    def __init__(self) -> None:
        self.taken = False  # a connection of ours owns the stream now
        self._ended = False
        self._releases: list[Callable[[], object]] = []

    def release(self, release: Callable[[], object]) -> None:
        """Runs `release` now, or, when a connection has taken the stream over and is still
        open, when it ends. Layers call this from their `finally`, innermost first."""
        if self.taken and not self._ended:
            self._releases.append(release)
        else:
            release()

    def take(self) -> None:
        """A connection takes the stream over: releases wait for its `end`."""
        self.taken = True

    def end(self) -> None:
        """The connection that took the stream ended: runs every release, in the order given,
        each even if one before it failed; later releases run at once."""
        if self._ended:
            return
        self._ended = True
        releases, self._releases = self._releases, []
        for release in releases:
            try:
                release()
            except Exception:
                log.exception("a stream's release failed")


def handoff_of(scope: Any) -> Handoff:
    """The request's handoff (every layer of one request sees the same one)."""
    handoff = scope.get(HANDOFF)
    if handoff is None:
        handoff = scope[HANDOFF] = Handoff()
    return handoff  # type: ignore[no-any-return]


def release_when_done(scope: Any, release: Callable[[], object]) -> None:
    """`release` now, or when the connection that took this request's stream over ends; a
    request that is no stream has no handoff, and none is made for it."""
    handoff = scope.get(HANDOFF)
    if handoff is None:
        release()
    else:
        handoff.release(release)


def in_background(coroutine: Coroutine[Any, Any, None]) -> None:
    """Runs a release that must await (a hub unsubscription) as a task of its own."""
    task = asyncio.get_running_loop().create_task(coroutine)
    _releasing.add(task)
    task.add_done_callback(_releasing.discard)
