"""Per-workspace limits (SPEC 6, "Limits"): requests a minute, the burst allowance that paces
them, and open streams, counted across replicas through the bus, answered 429 `RATE_LIMITED`
with `Retry-After` and the `X-RateLimit-*` headers, and blind to other workspaces. The
bookkeeping itself is tested as a pure core in tests/test_limit_book.py."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import websockets
from websockets.asyncio.client import connect

from switchboard.limits.book import WINDOW_SECONDS, seconds_to_reset
from tests.harness import ServerThread, Workspace, eventually

# --- two replicas on one bus -----------------------------------------------------------------

RATE = 12
Pair = tuple[ServerThread, ServerThread]
STREAMS = 2


@pytest.fixture(scope="module")
def limited_pair(make_server: Callable[..., ServerThread]) -> Pair:
    limits = {
        "workspace_rate_per_minute": RATE,
        "workspace_max_streams": STREAMS,
        # A burst of the whole minute: these tests are about the minute's count and the stream
        # slots; the burst allowance has its own pair below.
        "workspace_burst_seconds": float(WINDOW_SECONDS),
    }
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


# --- the burst allowance across two replicas -------------------------------------------------

# Six requests a minute, at most five at once: the fifth takes the allowance's last token
# while the minute still has room, so the sixth is refused by the allowance alone. A token
# comes back every 10 s, far longer than the test takes, so the counts below are exact.
PACED_RATE = 6
BURST = 5


@pytest.fixture(scope="module")
def paced_pair(make_server: Callable[..., ServerThread]) -> Pair:
    limits = {
        "workspace_rate_per_minute": PACED_RATE,
        "workspace_burst_seconds": BURST * WINDOW_SECONDS / PACED_RATE,
    }
    return make_server(**limits), make_server(**limits)


async def test_a_burst_beyond_the_allowance_is_refused_across_replicas_with_the_headers(
    paced_pair: Pair, workspace: Workspace, other_workspace: Workspace
) -> None:
    a, b = paced_pair
    async with httpx.AsyncClient(base_url=a.url) as on_a, httpx.AsyncClient(base_url=b.url) as on_b:
        # Spending under the allowance is admitted; Remaining counts down what is really left
        # (the tokens, fewer than the minute's rest).
        remaining = []
        for _ in range(3):
            response = await on_a.get("/v1/workspace", headers=workspace.headers)
            assert response.status_code == 200
            assert response.headers["x-ratelimit-limit"] == str(PACED_RATE)
            remaining.append(int(response.headers["x-ratelimit-remaining"]))
        assert remaining == [4, 3, 2]
        await eventually(lambda: known_usage(b, workspace.id) == 3, within=5)
        # Replica B has heard A's three: it admits the last two tokens, then refuses.
        answers = [await on_b.get("/v1/workspace", headers=workspace.headers) for _ in range(3)]
        assert [r.status_code for r in answers] == [200, 200, 429]
        assert [r.headers["x-ratelimit-remaining"] for r in answers] == ["1", "0", "0"]
        refused = answers[-1]
        assert refused.json()["error_code"] == "RATE_LIMITED"
        assert f"at most {BURST} at once" in refused.json()["message"]
        retry_after = int(refused.headers["retry-after"])
        assert 1 <= retry_after <= WINDOW_SECONDS // PACED_RATE  # the next token, not the minute
        assert refused.headers["x-ratelimit-reset"] == str(retry_after)
        assert refused.headers["x-ratelimit-limit"] == str(PACED_RATE)
        # Replica A refuses too once it hears B's two; a stream's open as well.
        await eventually(lambda: known_usage(a, workspace.id) == BURST, within=5)
        assert (await on_a.get("/v1/workspace", headers=workspace.headers)).status_code == 429
        async with open_stream(on_a, workspace) as status:
            assert status == 429
        # The refusals were not counted, on either replica; another workspace is untouched.
        assert known_usage(a, workspace.id) == known_usage(b, workspace.id) == BURST
        assert (await on_a.get("/v1/workspace", headers=other_workspace.headers)).status_code == 200
