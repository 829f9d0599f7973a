"""The outage log (pure, on an injected clock): one line when a dependency goes down, a
reminder at most every `remind_every` seconds, one line when it comes back; and which errors
count as an outage at all."""

from __future__ import annotations

import errno
import logging

import asyncpg
import pytest

from switchboard.outage import BusUnavailable, OutageLog, unavailable_dependency


def test_an_outage_logs_its_start_reminders_and_end_only(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    outage = OutageLog(logging.getLogger("test.outage"), "the database", clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.outage"):
        outage.recovered()  # nothing was down: nothing to say
        for _ in range(100):  # 100 failures over 50 s
            outage.failed(ConnectionRefusedError())
            now[0] += 0.5
        outage.recovered()
        outage.recovered()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith("the database is unavailable (ConnectionRefusedError)")
    assert "still unavailable after 30 s (61 failures" in lines[1]
    assert lines[2].startswith("the database is available again after 50.0 s")
    assert all(record.exc_info is None for record in caplog.records)


def test_only_dependency_errors_count_as_outages() -> None:
    assert unavailable_dependency(ConnectionRefusedError()) == "database"
    assert unavailable_dependency(asyncpg.CannotConnectNowError("starting")) == "database"
    assert unavailable_dependency(BusUnavailable("no ack")) == "bus"
    assert unavailable_dependency(OSError(errno.EHOSTUNREACH, "No route to host")) == "database"
    assert unavailable_dependency(FileNotFoundError(errno.ENOENT, "gone")) is None
    assert unavailable_dependency(ValueError("a bug")) is None
    assert unavailable_dependency(asyncpg.UniqueViolationError("dup")) is None
