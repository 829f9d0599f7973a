"""Dependency outages: which exceptions mean "Postgres or NATS is down" (a 503, a retry, never a
500 or a traceback), and a log that says so once when it starts, once when it ends, and with a
rate-limited reminder in between, instead of one traceback per event per retry."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable

import asyncpg
import nats.errors
import nats.js.errors

# Postgres unreachable, restarting, shutting down, or a connection lost mid-query.
_DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,  # admin / crash shutdown, cannot connect now
    asyncpg.InterfaceError,  # "connection is closed", a pool closing under a request
    ConnectionError,  # refused, reset: what a stopped server looks like from the socket
)
_BUS_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
)

# A server that is gone or cut off, as the socket layer says it (an OSError with one of these
# codes); other OSErrors, a missing file say, are bugs and must stay 500s.
_UNREACHABLE = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ETIMEDOUT,
        errno.EPIPE,
    }
)

REMIND_EVERY = 30.0  # seconds between "still down" lines


class BusUnavailable(RuntimeError):
    """NATS did not accept a message in time; nothing was published."""


def unavailable_dependency(error: BaseException) -> str | None:
    """Which dependency `error` says is down ("database" or "bus"), or None: not an outage
    but a bug, which callers must not hide behind a 503 or a retry."""
    if isinstance(error, (BusUnavailable, *_BUS_ERRORS)):
        return "bus"
    if isinstance(error, _DATABASE_ERRORS):
        return "database"
    if isinstance(error, OSError) and error.errno in _UNREACHABLE:
        return "database"
    return None


class OutageLog:
    """Logs one component's view of one dependency: `failed()` on each failure, `recovered()`
    on each success. Only transitions and a reminder every `remind_every` seconds are written."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        remind_every: float = REMIND_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.what = what
        self.remind_every = remind_every
        self.clock = clock
        self.down_since: float | None = None
        self.failures = 0
        self._last_line = 0.0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, error: BaseException) -> None:
        now = self.clock()
        self.failures += 1
        reason = type(error).__name__
        if self.down_since is None:
            self.down_since = self._last_line = now
            self.logger.warning("%s is unavailable (%s); retrying", self.what, reason)
        elif now - self._last_line >= self.remind_every:
            self._last_line = now
            self.logger.warning(
                "%s still unavailable after %.0f s (%d failures; last: %s)",
                self.what,
                now - self.down_since,
                self.failures,
                reason,
            )

    def recovered(self) -> None:
        if self.down_since is None:
            return
        self.logger.warning(
            "%s is available again after %.1f s", self.what, self.clock() - self.down_since
        )
        self.down_since = None
        self.failures = 0
