"""Stream affinity across a serve's gateway workers (issue 13, what a call's events cost).

The kernel spreads connections over the workers (SO_REUSEPORT) by their addresses, so the
streams of one call used to land on every worker, and every worker then subscribed to that
call's subjects and paid for each of its events: the NATS delivery, the wakeup, the decode, the
walk over its watchers. That per-event cost, paid once per worker, was a large part of what
separated our CPU per frame from a C gateway's. Now each call and conversation has one owner
among the workers (a hash of its id), and a worker that accepts the first request of a
connection for a stream that another worker owns passes the connection itself to the owner: its
descriptor over a Unix socket (SCM_RIGHTS) with the bytes already read, which the owner parses
as if it had read them. So each event wakes one of a serve's workers, whichever one a client
reached.

A connection is passed only when nothing has been answered on it yet (its first request, whole
in what was read), and never twice. When the owner cannot take it at once (not started yet,
restarting, stopping, its queue full) the worker that accepted it serves it itself, as before:
affinity saves CPU and never decides whether a stream is served. The workspace stream
(`/v1/events/stream`) names no id in its path and is served where it lands."""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import re
import socket
import zlib
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# Streams whose topic is named by the id in their path (SPEC 5): a call's transcript and its
# WebSocket share the call's owner, a conversation's stream the conversation's.
KEYED_STREAM = re.compile(
    rb"/v1/(?:calls/([^/?#]+)/(?:transcript/)?stream|conversations/([^/?#]+)/stream)(?:\?|$)"
)
# What is passed with a connection: its first request's head and whatever came with it. A head
# is at most 16 KiB (SPEC 6) and a stream's request has no body; a larger read stays here.
MAX_PASSED_BYTES = 64 * 1024

# Accepts a connection passed to this worker: its socket and the bytes read from it so far.
Adopt = Callable[[socket.socket, bytes], None]


def owner_of(target: bytes, workers: int) -> int | None:
    """The worker (0 .. workers - 1) that serves the stream a request target names, or None
    when the target is not a stream keyed by an id (pure)."""
    match = KEYED_STREAM.match(target)
    if match is None or workers < 2:
        return None
    key = match.group(1) or match.group(2)
    return zlib.crc32(key) % workers


class Handoffs:
    """One gateway worker's end of the exchange: where connections are passed to it, and how it
    passes them on. Each worker listens on `worker-<index>.sock` in a directory only this
    serve's user may enter (the supervisor makes it 0700), and keeps one connection to each
    other worker it has passed a stream to.

    The sockets are SOCK_SEQPACKET: each message is one passed connection, whole, and a
    connected pair is bounded by its buffer (hundreds of messages), where unconnected datagram
    sockets queue only `net.unix.max_dgram_qlen` (10 here), which an open storm overflowed."""

    def __init__(
        self, directory: Path, index: int, workers: int, counts: dict[str, int] | None = None
    ) -> None:
        self.directory = directory
        self.index = index
        self.workers = workers
        self._listener: socket.socket | None = None
        self._peers: set[socket.socket] = set()  # connections other workers pass streams on
        self._owners: dict[int, socket.socket] = {}  # ours to the workers we pass streams to
        # By outcome: "passed" to their owner, "adopted" from another worker, "kept" (another
        # worker owns the stream but could not take it, so this one served it).
        self.counts: dict[str, int] = counts if counts is not None else {}

    def path(self, index: int) -> str:
        return str(self.directory / f"worker-{index}.sock")

    def owner(self, target: bytes) -> int | None:
        """The other worker that owns this request's stream, or None (this one serves it)."""
        owner = owner_of(target, self.workers)
        return None if owner == self.index else owner

    def open(self, adopt: Adopt) -> None:
        """Starts taking connections (once this worker serves requests) and passing them."""
        path = self.path(self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a previous process of this index (a restart)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.setblocking(False)
            listener.bind(path)
            listener.listen(64)
        except OSError as failure:
            # A path too long for a Unix socket (a deep TMPDIR), a full disk: this worker
            # serves what it accepts, and the others keep what they would have passed to it.
            listener.close()
            log.warning("stream affinity is off in worker %d: %s", self.index + 1, failure)
            return
        self._listener = listener
        asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, adopt)

    def close(self) -> None:
        """Stops taking and passing connections: from now on each worker serves what it
        accepted. (A connection in flight to this worker as it closes is closed with it; its
        client reconnects, as after any drain.)"""
        loop = asyncio.get_running_loop()
        listener, self._listener = self._listener, None
        if listener is not None:
            loop.remove_reader(listener.fileno())
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(self.index))
            listener.close()
        for peer in self._peers:
            loop.remove_reader(peer.fileno())
            peer.close()
        self._peers.clear()
        for channel in self._owners.values():
            channel.close()
        self._owners.clear()

    def send(self, owner: int, fd: int, head: bytes) -> bool:
        """Passes a connection (its descriptor and the bytes read from it) to `owner`; False
        when the owner cannot take it now, and this worker must serve it. Never blocks."""
        passable = self._listener is not None and len(head) <= MAX_PASSED_BYTES
        channel = self._channel(owner) if passable else None
        if channel is None:
            self._count("kept")
            return False
        descriptors = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        try:
            channel.sendmsg([head], descriptors)
        except BlockingIOError:  # its queue is full: it is behind, so this one serves it
            self._count("kept")
            return False
        except OSError as failure:  # it stopped or died: connect again next time
            log.debug("worker %d could not take a stream: %s", owner + 1, failure)
            self._forget(owner)
            self._count("kept")
            return False
        self._count("passed")
        return True

    def _channel(self, owner: int) -> socket.socket | None:
        channel = self._owners.get(owner)
        if channel is None:
            channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            channel.setblocking(False)
            try:
                channel.connect(self.path(owner))
            except OSError:  # not listening (not started, restarting or stopped), or swamped
                channel.close()
                return None
            self._owners[owner] = channel
        return channel

    def _forget(self, owner: int) -> None:
        channel = self._owners.pop(owner, None)
        if channel is not None:
            channel.close()

    def _count(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    def _accept(self, adopt: Adopt) -> None:
        listener = self._listener
        while listener is not None:
            try:
                peer, _address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            peer.setblocking(False)
            self._peers.add(peer)
            asyncio.get_running_loop().add_reader(peer.fileno(), self._receive, peer, adopt)

    def _receive(self, peer: socket.socket, adopt: Adopt) -> None:
        while peer in self._peers:
            try:
                head, fds, flags, _address = socket.recv_fds(peer, MAX_PASSED_BYTES, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                head, fds, flags = b"", [], 0
            if not head and not fds:  # the other worker closed its end (it stopped or died)
                asyncio.get_running_loop().remove_reader(peer.fileno())
                self._peers.discard(peer)
                peer.close()
                return
            if len(fds) != 1 or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                for fd in fds:
                    os.close(fd)  # cut short: what the client sent cannot be read whole
                continue
            self._count("adopted")
            adopt(socket.socket(fileno=fds[0]), head)
