"""Webhook senders: lease due deliveries (any number of senders, `FOR UPDATE SKIP LOCKED`),
POST them signed, record every attempt, and schedule the next one. One slow or dead receiver
never delays the others: each endpoint has at most `per_endpoint` attempts in flight, and a
busy endpoint's deliveries are not even leased until a slot frees up. Each POST goes to an
address its URL's host resolved to and that was checked just before (see safety)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from switchboard.db import Database
from switchboard.ids import utc_now
from switchboard.outage import OutageLog, unavailable_dependency
from switchboard.webhooks.safety import (
    IPAddress,
    Resolver,
    UnsafeUrl,
    WebhookUrl,
    check_shape,
    checked_addresses,
    resolve_host,
)
from switchboard.webhooks.schedule import next_attempt
from switchboard.webhooks.signing import delivery_headers

log = logging.getLogger(__name__)

ATTEMPT_TIMEOUT = 10.0  # SPEC: a 2xx within 10 s is success
MAX_RESPONSE_BYTES = 4096  # read at most this much of a receiver's answer
LEASE_SECONDS = 60  # > the attempt timeout: a lease outlives any attempt it covers


@dataclass(frozen=True)
class AttemptOutcome:
    ok: bool
    status_code: int | None
    latency_ms: float
    error: str | None
    retry_after: timedelta | None


def retry_after_of(value: str | None, now: datetime) -> timedelta | None:
    """`Retry-After` as seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    if value.strip().isdigit():
        return timedelta(seconds=int(value.strip()))
    try:
        return max(timedelta(0), parsedate_to_datetime(value) - now)
    except (TypeError, ValueError):
        return None


async def post_signed(
    http: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    allow_private: bool,
    now: datetime,
    resolve: Resolver = resolve_host,
) -> AttemptOutcome:
    """One POST of a signed body: the host resolved once (by `resolve`), every address checked,
    the request sent to a checked address, no redirects (the client's setting), at most
    MAX_RESPONSE_BYTES of the answer read. Never raises for the receiver's faults."""
    started = time.perf_counter()
    try:
        target = check_shape(url)
        addresses = await checked_addresses(target, allow_private, resolve)
        status, retry_after = await _post_to_first(http, target, addresses, body, headers, now)
    except UnsafeUrl as unsafe:
        return AttemptOutcome(False, None, 0.0, f"refused: {unsafe}", None)
    except httpx.TimeoutException:
        message = f"no answer within {http.timeout.read or 0:g} s"
        return AttemptOutcome(False, None, _ms(started), message, None)
    except httpx.HTTPError as failure:
        return AttemptOutcome(False, None, _ms(started), f"{type(failure).__name__}", None)
    return AttemptOutcome(200 <= status < 300, status, _ms(started), None, retry_after)


async def _post_to_first(
    http: httpx.AsyncClient,
    target: WebhookUrl,
    addresses: list[IPAddress],
    body: bytes,
    headers: dict[str, str],
    now: datetime,
) -> tuple[int, timedelta | None]:
    """(status, Retry-After) from the first address that takes the connection: a dual-stack
    host may be unreachable over one family. Only a failed connect moves on, so nothing is
    ever sent twice."""
    for address in addresses[:-1]:
        with contextlib.suppress(httpx.ConnectError):
            return await _post_to(http, target, address, body, headers, now)
    return await _post_to(http, target, addresses[-1], body, headers, now)


async def _post_to(
    http: httpx.AsyncClient,
    target: WebhookUrl,
    address: IPAddress,
    body: bytes,
    headers: dict[str, str],
    now: datetime,
) -> tuple[int, timedelta | None]:
    """POSTs to `address` as if connected by name: the URL's Host header, and over TLS its
    name for SNI and for checking the certificate (httpcore's `sni_hostname` extension)."""
    headers = {**headers, "Host": target.host_header}
    extensions: dict[str, str] = {}
    if target.url.scheme == "https":
        extensions["sni_hostname"] = target.host
        # The client pools connections by the address in the URL, not by the TLS name: a kept
        # connection could carry another host's request over a TLS session that was verified
        # for this one. So a TLS connection serves one attempt.
        headers["Connection"] = "close"
    request = http.stream(
        "POST", target.at(address), content=body, headers=headers, extensions=extensions
    )
    async with request as response:
        read = 0
        async for chunk in response.aiter_raw():
            read += len(chunk)
            if read >= MAX_RESPONSE_BYTES:
                break
        return response.status_code, retry_after_of(response.headers.get("retry-after"), now)


class Sender:
    def __init__(
        self,
        database: Database,
        *,
        allow_private: bool = False,
        per_endpoint: int = 4,
        max_in_flight: int = 64,
        clock: Callable[[], datetime] = utc_now,
        rng: random.Random | None = None,
        poll_interval: float = 0.5,
        attempt_timeout: float = ATTEMPT_TIMEOUT,
        resolve: Resolver = resolve_host,
    ) -> None:
        self.database = database
        self.allow_private = allow_private
        self.resolve = resolve
        self.per_endpoint = per_endpoint
        self.max_in_flight = max_in_flight
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - retry jitter, not a secret
        self.poll_interval = poll_interval
        self.http = httpx.AsyncClient(follow_redirects=False, timeout=attempt_timeout)
        self._in_flight: dict[str, int] = {}  # endpoint_id -> attempts running
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None
        # A Postgres outage fails every lease and every record: one line when it starts, one
        # when it ends, a reminder in between, instead of a traceback per iteration.
        self.outage = OutageLog(log, "webhook sender: database")

    async def start(self) -> None:
        self._loop = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stops at once; attempts cut short keep their lease and are retried after it ends."""
        for task in [t for t in (self._loop, *self._tasks) if t is not None]:
            task.cancel()
        for task in [t for t in (self._loop, *self._tasks) if t is not None]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.http.aclose()

    async def _run(self) -> None:
        while True:
            try:
                started = await self.run_once()
            except Exception as error:
                self._failed(error, "leasing deliveries")
                started = 0
            else:
                self.outage.recovered()
            if not started:
                await asyncio.sleep(self.poll_interval)

    def _failed(self, error: Exception, doing: str) -> None:
        if unavailable_dependency(error) == "database":
            self.outage.failed(error)
        else:  # a bug: worth its traceback
            log.exception("webhook sender: %s failed; retrying", doing)

    async def run_once(self) -> int:
        """Leases what is due and can start now, starts those attempts; returns how many."""
        room = self.max_in_flight - len(self._tasks)
        if room <= 0:
            return 0
        busy = [e for e, n in self._in_flight.items() if n >= self.per_endpoint]
        async with self.database.pool.acquire() as conn:
            leased = await conn.fetch(
                "SELECT * FROM claim_deliveries($1, $2, $3, $4)",
                self.clock(),
                room,
                LEASE_SECONDS,
                busy,
            )
        for row in leased:
            task = asyncio.create_task(self._deliver(row["delivery_id"], row["workspace_id"]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(leased)

    async def wait_idle(self) -> None:
        """Until the attempts started so far have finished (for tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _deliver(self, delivery_id: str, workspace_id: str) -> None:
        """`deliver` as a task of its own: its failure is logged here, since nobody awaits it.
        A delivery that could not be read or recorded keeps its lease and is tried again once
        the lease ends."""
        try:
            await self.deliver(delivery_id, workspace_id)
        except Exception as error:
            self._failed(error, f"delivery {delivery_id}")

    async def deliver(self, delivery_id: str, workspace_id: str) -> None:
        async with self.database.workspace(workspace_id) as conn:
            row = await conn.fetchrow(
                """SELECT d.*, e.url, e.enabled, e.secret, e.previous_secret, e.previous_expires_at
                   FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id
                   WHERE d.id = $1""",
                delivery_id,
            )
        if row is None or row["status"] != "pending":
            return
        endpoint_id = row["endpoint_id"]
        self._in_flight[endpoint_id] = self._in_flight.get(endpoint_id, 0) + 1
        try:
            outcome = await self.attempt(row)
        finally:
            self._in_flight[endpoint_id] -= 1
            if not self._in_flight[endpoint_id]:
                del self._in_flight[endpoint_id]
        await self.record(row, outcome)

    async def attempt(self, row: Any) -> AttemptOutcome:
        now = self.clock()
        secrets_in_use = [row["secret"]]
        if (
            row["previous_secret"]
            and row["previous_expires_at"]
            and row["previous_expires_at"] > now
        ):
            secrets_in_use.append(row["previous_secret"])
        body = bytes(row["body"])
        headers = delivery_headers(secrets_in_use, row["event_id"], int(now.timestamp()), body)
        return await post_signed(
            self.http, row["url"], body, headers, self.allow_private, now, self.resolve
        )

    async def record(self, row: Any, outcome: AttemptOutcome) -> None:
        now = self.clock()
        first = row["first_attempt_at"] or now
        attempts = row["attempts"] + 1
        if outcome.ok:
            status, upcoming = "succeeded", None
        else:
            upcoming = next_attempt(
                first, attempts, now, retry_after=outcome.retry_after, rng=self.rng
            )
            status = "pending" if upcoming is not None else "failed"
        async with self.database.workspace(row["workspace_id"]) as conn:
            await conn.execute(
                """INSERT INTO webhook_attempts (workspace_id, delivery_id, attempted_at,
                                                 status_code, latency_ms, error, next_attempt_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)""",
                row["workspace_id"],
                row["id"],
                now,
                outcome.status_code,
                outcome.latency_ms,
                outcome.error,
                upcoming,
            )
            await conn.execute(
                """UPDATE webhook_deliveries SET status = $2, attempts = $3, first_attempt_at = $4,
                          next_attempt_at = coalesce($5, next_attempt_at), lease_until = NULL
                   WHERE id = $1""",
                row["id"],
                status,
                attempts,
                first,
                upcoming,
            )
        if status == "failed":
            log.warning(
                "webhook delivery failed for good after 24 h", extra={"delivery_id": row["id"]}
            )


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
