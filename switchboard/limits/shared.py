"""The shell around `LimitBook`: every process (replica or worker) reports its counts to a
JetStream key-value bucket and hears everyone's reports as they are written.

Reports are plain core publishes on the bucket's subjects (`$KV.<bucket>.<key>`): the bucket's
stream keeps the latest per key (so a process that starts mid-window loads what the others
admitted so far, and a restarted process's earlier admissions keep counting under its old
name), and every process's subscription on the same subjects hears them at once. A request
waits on nothing: its decision uses the counts already heard, and a changed count is reported
within `REPORT_PACE` seconds. So the request limits can be passed by what the *other*
processes admit in one report interval plus one bus hop (about 6 ms on one machine): at most
`(processes - 1) x (their admission rate for that workspace) x ~6 ms`, a few requests.
For the minute that is the whole overshoot. The burst allowance takes it back: requests heard
of late are a debt on the bucket, so over any stretch the workspace is admitted at most its
burst, plus the average rate times the stretch, plus those few in flight.

Open streams are bounded exactly instead: each takes a slot granted through the workspace's
ledger (`slots.py`), so concurrent opens on every process never pass the limit, however late
reports are heard. Every process beats (`h.<replica>`) every REFRESH_SECONDS, which is how the
others tell a live process's grants from a dead one's, and hears every ledger write, which is
how a refusal learns that a slot was given back.

With the bus down each process keeps counting alone (each admits the whole quota, and streams
are decided from the last reports heard) and reports when it is back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from switchboard.bus import Bus
from switchboard.limits.book import REFRESH_SECONDS, WINDOW_SECONDS, LimitBook, Verdict
from switchboard.limits.slots import TRUST_SECONDS, LedgerUnavailable, StreamSlots
from switchboard.stopping import cancel_and_wait

log = logging.getLogger(__name__)

BUCKET = "switchboard_limits"
# The stream ledgers: one entry per workspace, kept until rewritten (no TTL: a ledger lives as
# long as its streams, and an expired one would forget live grants).
GRANTS_BUCKET = "switchboard_stream_grants"
GRANTS_PREFIX = f"$KV.{GRANTS_BUCKET}."
SUBJECT_PREFIX = f"$KV.{BUCKET}."
# Two windows' worth: an entry is of no use once its window is over.
ENTRY_TTL = 2.0 * WINDOW_SECONDS + 10
REPORT_PACE = 0.005  # seconds: at most 200 reports a second per process, however busy
LOAD_TIMEOUT = 5.0
BUCKET_ATTEMPTS = 4  # of the server's 5 s each, at start


class SharedLimits:
    def __init__(
        self,
        bus: Bus,
        *,
        rate_per_minute: int,
        max_streams: int,
        burst_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bus = bus
        self.clock = clock
        self.book = LimitBook(secrets.token_hex(6), rate_per_minute, max_streams, burst_seconds)
        self._changed = asyncio.Event()
        self._subscription: Subscription | None = None
        self._ledger_writes: Subscription | None = None
        self._reporter: asyncio.Task[None] | None = None
        self._slots: StreamSlots | None = None  # set by start
        self._stopping = False
        self._beaten = -TRUST_SECONDS  # wall clock of this process's last heartbeat sent

    @property
    def slots(self) -> StreamSlots:
        if self._slots is None:
            raise RuntimeError("SharedLimits.start was not awaited")
        return self._slots

    # --- the request path: no await, but for a stream this process holds no slot for ------

    def admit_request(self, workspace_id: str) -> Verdict:
        verdict = self.book.admit_request(workspace_id, self.clock())
        if verdict.allowed:
            self._changed.set()
        return verdict

    def request_verdict(self, workspace_id: str) -> Verdict:
        """Whether one more request would be admitted now; counts nothing."""
        return self.book.request_verdict(workspace_id, self.clock())

    async def open_stream(self, workspace_id: str) -> Verdict:
        """Needs room in both request limits and a stream slot; waits on the bus only when this
        process holds no free slot for the workspace."""
        request = self.request_verdict(workspace_id)
        if not request.allowed:
            return request
        try:
            taken = await self.slots.take(workspace_id)
        except LedgerUnavailable as failure:
            log.debug("stream ledger unavailable (%s): the reports decide", failure)
            verdict = self.book.open_stream(workspace_id, self.clock())
            if verdict.allowed:
                self.slots.count_untaken(workspace_id)
                self._changed.set()
            return verdict
        if not taken:
            return self.book.streams_full()
        verdict = self.book.open_stream(workspace_id, self.clock(), slot_taken=True)
        if not verdict.allowed:  # the request limits filled while the ledger was written
            self.slots.give_back(workspace_id)
        self._changed.set()
        return verdict

    def close_stream(self, workspace_id: str) -> None:
        self.book.close_stream(workspace_id)
        self.slots.give_back(workspace_id)
        self._changed.set()

    # --- the shell --------------------------------------------------------------------------

    async def start(self) -> None:
        config = KeyValueConfig(
            bucket=BUCKET,
            history=1,
            ttl=ENTRY_TTL,
            storage=StorageType.FILE,
            replicas=self.bus.replicas,
        )
        kv = await self._bucket(config)
        grants = await self._bucket(
            KeyValueConfig(
                bucket=GRANTS_BUCKET,
                history=1,
                storage=StorageType.FILE,
                replicas=self.bus.replicas,
            )
        )
        self._slots = StreamSlots(
            grants,
            replica=self.book.replica,
            limit=self.book.max_streams,
            clock=self.clock,
            alive=lambda replica, at: self.book.alive(replica, at, self.clock()),
            trusted=lambda: self.clock() - self._beaten < TRUST_SECONDS,
        )
        slots = self._slots

        async def ledger_written(msg: Msg) -> None:
            slots.changed(msg.subject.removeprefix(GRANTS_PREFIX), msg.data)

        self._ledger_writes = await self.bus.client.subscribe(
            GRANTS_PREFIX + ">", cb=ledger_written
        )
        # Subscribe first, then load: a report written in between is heard twice, never missed.
        self._subscription = await self.bus.client.subscribe(SUBJECT_PREFIX + ">", cb=self._heard)
        try:
            keys = await kv.keys()
        except NoKeysError:
            keys = []
        now = self.clock()
        for key in keys:
            with contextlib.suppress(NatsError, asyncio.TimeoutError):
                entry = await asyncio.wait_for(kv.get(key), LOAD_TIMEOUT)
                if entry.value is not None:
                    self.book.apply(key, entry.value, now, loaded=True)
        await self._beat(now)
        self._reporter = asyncio.create_task(self._report_forever())

    async def _bucket(self, config: KeyValueConfig) -> KeyValue:
        js = self.bus.js
        assert config.bucket is not None
        for attempt in range(1, BUCKET_ATTEMPTS + 1):
            try:
                try:
                    return await js.key_value(config.bucket)
                except BucketNotFoundError:
                    # Replicas starting together may race to create it: the same config is
                    # accepted.
                    return await js.create_key_value(config)
            except NatsTimeout:
                # In a cluster, a bucket another replica has just made may not answer until
                # its replicas have chosen a leader.
                if attempt == BUCKET_ATTEMPTS:
                    raise
                log.info("the %s bucket did not answer yet; asking again", config.bucket)
        raise AssertionError("unreachable")

    async def _beat(self, now: float) -> None:
        key, value = self.book.heartbeat(now)
        try:
            await self.bus.client.publish(SUBJECT_PREFIX + key, value)
        except (NatsError, OSError) as failure:  # OSError: the socket broke mid-write
            log.debug("heartbeat not sent: %s", type(failure).__name__)
            return
        self._beaten = now

    async def _heard(self, msg: Msg) -> None:
        self.book.apply(msg.subject.removeprefix(SUBJECT_PREFIX), msg.data, self.clock())

    async def _report_forever(self) -> None:
        next_refresh = self.clock() + REFRESH_SECONDS
        while not self._stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), REFRESH_SECONDS)
            self._changed.clear()
            now = self.clock()
            if now >= next_refresh:
                self.book.refresh()
                self.book.prune(now)
                await self._beat(now)
                next_refresh = now + REFRESH_SECONDS
            await self._publish(now)
            try:
                await self.slots.trim()
            except Exception:  # a bug must not stop the reports as well
                log.exception("giving back stream slots failed")
            # Pacing, not synchronisation: changes in this interval go out in the next report.
            await asyncio.sleep(REPORT_PACE)

    async def _publish(self, now: float) -> None:
        for key, value in self.book.reports(now):
            try:
                await self.bus.client.publish(SUBJECT_PREFIX + key, value)
            except (NatsError, OSError) as failure:  # OSError: the socket broke mid-write
                # Counting goes on locally; the refresh reports the streams again later and
                # the next admission reports the requests again.
                log.debug("limits report not sent: %s", type(failure).__name__)

    async def stop(self) -> None:
        """Reports this process's streams as gone (they are, after the drain)."""
        # Python 3.11's wait_for can swallow the reporter's cancellation: the flag ends its loop.
        self._stopping = True
        if self._reporter is not None:
            await cancel_and_wait([self._reporter])
        self.book.forget_streams()
        if self._slots is not None:
            await self._slots.release_all()
        with contextlib.suppress(NatsError, asyncio.TimeoutError):
            await self._publish(self.clock())
            await self.bus.client.flush(timeout=2)
        for subscription in (self._subscription, self._ledger_writes):
            if subscription is not None:
                with contextlib.suppress(NatsError):
                    await subscription.unsubscribe()
