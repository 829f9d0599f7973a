"""Per-workspace limits (SPEC 6, "Limits"): requests a minute and open streams, counted across
replicas through the bus, answered 429 `RATE_LIMITED` with `Retry-After` and the
`X-RateLimit-*` headers, and blind to other workspaces. The bookkeeping itself is tested as a
pure core below."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import websockets
from websockets.asyncio.client import connect

from switchboard.limits.book import (
    STALE_AFTER,
    WINDOW_SECONDS,
    LimitBook,
    request_key,
    seconds_to_reset,
    stream_key,
)
from tests.harness import ServerThread, Workspace, eventually

# --- the pure core ---------------------------------------------------------------------------

T0 = 1_000_000 * WINDOW_SECONDS + 5.0  # five seconds into a window


def test_requests_are_refused_at_the_limit_and_refusals_are_not_counted() -> None:
    book = LimitBook("me", rate_per_minute=3, max_streams=10)
    verdicts = [book.admit_request("ws_a", T0) for _ in range(5)]
    assert [v.allowed for v in verdicts] == [True, True, True, False, False]
    assert [v.remaining for v in verdicts] == [2, 1, 0, 0, 0]
    assert book.requests_used("ws_a", T0) == 3
    assert verdicts[0].reset == 55
    # The next window starts from zero: the refusals did not count.
    assert book.admit_request("ws_a", T0 + WINDOW_SECONDS).allowed
    assert book.admit_request("ws_b", T0).allowed  # another workspace is untouched


def test_the_other_processes_reports_count_and_this_ones_own_echo_does_not() -> None:
    book = LimitBook("me", rate_per_minute=10, max_streams=3)
    window = int(T0 // WINDOW_SECONDS)
    book.apply(request_key(window, "ws_a", "peer1"), b"4", T0)
    book.apply(request_key(window, "ws_a", "peer2"), b"5", T0)
    book.apply(request_key(window, "ws_a", "me"), b"9", T0)  # our own report, heard back
    book.apply(request_key(window - 1, "ws_a", "peer3"), b"9", T0)  # a window that is over
    assert book.admit_request("ws_a", T0).remaining == 0
    assert not book.admit_request("ws_a", T0).allowed
    # A peer's later report replaces its earlier one (a count, not an increment).
    book.apply(request_key(window, "ws_a", "peer2"), b"5", T0)
    assert not book.admit_request("ws_a", T0).allowed


def test_streams_of_a_process_that_stopped_reporting_stop_counting() -> None:
    book = LimitBook("me", rate_per_minute=10, max_streams=3)
    book.apply(stream_key("ws_a", "peer"), b"2 %.3f" % T0, T0)
    assert book.open_stream("ws_a", T0).allowed
    assert not book.open_stream("ws_a", T0 + 1).allowed
    assert book.open_stream("ws_a", T0 + STALE_AFTER + 1).allowed  # the peer went quiet
    book.close_stream("ws_a")
    book.close_stream("ws_a")
    assert book.open_streams("ws_a", T0) == 2  # only the peer's, still fresh at T0


def test_reports_carry_what_changed_and_refresh_repeats_open_streams() -> None:
    book = LimitBook("me", rate_per_minute=10, max_streams=3)
    book.admit_request("ws_a", T0)
    book.admit_request("ws_a", T0)
    book.open_stream("ws_b", T0)
    window = int(T0 // WINDOW_SECONDS)
    assert dict(book.reports(T0)) == {
        request_key(window, "ws_a", "me"): b"2",
        stream_key("ws_b", "me"): b"1 %.3f" % T0,
    }
    assert book.reports(T0) == []
    book.refresh()
    assert [k for k, _ in book.reports(T0 + 10)] == [stream_key("ws_b", "me")]
    book.apply("garbage", b"x", T0)  # malformed reports are ignored
    book.apply(stream_key("ws_c", "peer"), b"not a count", T0)
    assert book.open_streams("ws_c", T0) == 0


def test_reset_is_whole_seconds_to_the_windows_end_and_never_zero() -> None:
    assert seconds_to_reset(T0) == 55
    assert seconds_to_reset(T0 - 5.0 + 59.999) == 1


# --- two replicas on one bus -----------------------------------------------------------------

RATE = 12
Pair = tuple[ServerThread, ServerThread]
STREAMS = 2


@pytest.fixture(scope="module")
def limited_pair(make_server: Callable[..., ServerThread]) -> Pair:
    limits = {"workspace_rate_per_minute": RATE, "workspace_max_streams": STREAMS}
    return make_server(**limits), make_server(**limits)


def room_in_this_window() -> None:
    """Counts start again at each wall-clock minute: a test that straddled the boundary would
    see its count reset half-way. Waiting for the next window is waiting on the clock, which
    nothing else can signal."""
    if seconds_to_reset(time.time()) < 20:
        time.sleep(seconds_to_reset(time.time()) + 0.1)


def known_usage(server: ServerThread, workspace_id: str) -> int:
    """How many of the workspace's requests this window the replica knows of (its own and its
    peers' reports), read on its loop."""
    assert server.services is not None
    book = server.services.limits.book
    return int(server.call(lambda: book.requests_used(workspace_id, time.time())))


async def test_the_request_limit_is_shared_by_replicas_and_answered_with_the_headers(
    limited_pair: tuple[ServerThread, ServerThread],
    workspace: Workspace,
    other_workspace: Workspace,
) -> None:
    room_in_this_window()
    a, b = limited_pair
    async with httpx.AsyncClient(base_url=a.url) as on_a, httpx.AsyncClient(base_url=b.url) as on_b:
        remaining = []
        for _ in range(RATE // 2):
            response = await on_a.get("/v1/workspace", headers=workspace.headers)
            assert response.status_code == 200
            assert response.headers["x-ratelimit-limit"] == str(RATE)
            remaining.append(int(response.headers["x-ratelimit-remaining"]))
        assert remaining == list(range(RATE - 1, RATE // 2 - 1, -1))
        # Replica B hears A's count through the bus, then admits only the rest.
        await eventually(lambda: known_usage(b, workspace.id) == RATE // 2, within=5)
        statuses = [
            (await on_b.get("/v1/workspace", headers=workspace.headers)).status_code
            for _ in range(RATE // 2 + 2)
        ]
        assert statuses == [200] * (RATE // 2) + [429, 429]
        await eventually(lambda: known_usage(a, workspace.id) == RATE, within=5)
        refused = await on_a.get("/v1/calls", headers=workspace.headers)
        assert refused.status_code == 429
        body = refused.json()
        assert body["error_code"] == "RATE_LIMITED"
        assert body["request_id"] == refused.headers["x-request-id"]
        retry_after = int(refused.headers["retry-after"])
        assert 1 <= retry_after <= WINDOW_SECONDS
        assert refused.headers["x-ratelimit-limit"] == str(RATE)
        assert refused.headers["x-ratelimit-remaining"] == "0"
        assert refused.headers["x-ratelimit-reset"] == str(retry_after)
        # A refused write changed nothing.
        created = await on_a.post(
            "/v1/calls",
            headers=workspace.headers,
            json={"to_number": "+14155550100", "from_number": "+14155550101"},
        )
        assert created.status_code == 429
        # Another workspace is not crowded out.
        assert (await on_a.get("/v1/workspace", headers=other_workspace.headers)).status_code == 200
        assert (await on_b.get("/v1/workspace", headers=other_workspace.headers)).status_code == 200
        # Nothing outside /v1 is counted.
        assert (await on_a.get("/healthz")).status_code == 200
    listed = await _count_calls(a, other_workspace)
    assert listed == 0


async def _count_calls(server: ServerThread, workspace: Workspace) -> int:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/v1/calls", headers=workspace.headers)
        assert response.status_code == 200
        return len(response.json()["calls"])


@contextlib.asynccontextmanager
async def open_stream(client: httpx.AsyncClient, workspace: Workspace) -> AsyncIterator[int]:
    async with client.stream("GET", "/v1/events/stream", headers=workspace.headers) as response:
        yield response.status_code


async def test_open_streams_are_capped_across_replicas_and_a_closed_one_frees_its_slot(
    limited_pair: tuple[ServerThread, ServerThread],
    workspace: Workspace,
    other_workspace: Workspace,
) -> None:
    a, b = limited_pair
    timeout = httpx.Timeout(10, read=None)
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=timeout) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=timeout) as on_b,
        open_stream(on_a, workspace) as first,
    ):
        assert first == 200
        async with open_stream(on_b, workspace) as second:
            assert second == 200
            assert b.services is not None and a.services is not None
            book_a = a.services.limits.book
            await eventually(
                lambda: a.call(lambda: book_a.open_streams(workspace.id, time.time())) == STREAMS,
                within=5,
            )
            refused = await on_a.get("/v1/events/stream", headers=workspace.headers)
            assert refused.status_code == 429
            assert refused.json()["error_code"] == "RATE_LIMITED"
            assert refused.headers["x-ratelimit-limit"] == str(STREAMS)
            assert refused.headers["x-ratelimit-remaining"] == "0"
            assert int(refused.headers["retry-after"]) >= 1
            # The WebSocket upgrade is refused the same way, before it is accepted.
            url = a.url.replace("http://", "ws://") + "/v1/calls/call_" + "0" * 22 + "/stream"
            with pytest.raises(websockets.exceptions.InvalidStatus) as refusal:
                async with connect(url, additional_headers=workspace.headers):
                    pass
            assert refusal.value.response.status_code == 429
            # Another workspace still opens streams.
            async with open_stream(on_b, other_workspace) as theirs:
                assert theirs == 200

        # The second stream closed: its slot is free again on both replicas.
        async def reopened() -> bool:
            async with open_stream(on_a, workspace) as status:
                return status == 200

        assert await eventually(reopened, within=5)
