"""A workspace over its request limits is refused by the HTTP protocol as soon as the request's
head is parsed (switchboard/api/early_refusal.py), with the answer the whole stack gives: the
same status, headers, envelope, access-log line and counts, on a connection that stays open
(or closes when the client asked). Requests whose answer the head alone cannot settle (a query
string, a body, a key not yet verified) take the normal path and are refused the same way."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Callable

import httpx
import pytest

from switchboard.limits.book import WINDOW_SECONDS
from tests.harness import ServerThread, Workspace, eventually

RATE = 3
EARLY = "switchboard_rate_limited_early_total"


@pytest.fixture(scope="module")
def limited(make_server: Callable[..., ServerThread]) -> ServerThread:
    return make_server(
        workspace_rate_per_minute=RATE, workspace_burst_seconds=float(WINDOW_SECONDS)
    )


def counted(metrics: str, name: str) -> int:
    found = re.search(rf'^{name}{{limit="requests_per_minute"}} (\d+)$', metrics, re.MULTILINE)
    return int(found.group(1)) if found else 0


async def raw_exchange(server: ServerThread, requests: list[bytes]) -> tuple[bytes, bool]:
    """Sends each request on one connection after the answer to the one before; returns every
    byte received, and whether the server closed the connection after the last answer."""
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    received = b""
    try:
        for request in requests:
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
            received += head + await asyncio.wait_for(reader.readexactly(length), 5)
        # Closed at once when asked; a kept-alive connection would wait 30 s for more.
        closed = await asyncio.wait_for(reader.read(1), 1) == b""
    except TimeoutError:
        closed = False
    finally:
        writer.close()
    return received, closed


def headers_of(response: bytes) -> dict[str, str]:
    lines = response.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")[1:]
    return {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}


async def test_a_refusal_at_the_head_is_the_answer_the_stack_gives(
    limited: ServerThread, workspace: Workspace, console_log: io.StringIO
) -> None:
    async with httpx.AsyncClient(base_url=limited.url) as client:
        for _ in range(RATE):
            assert (await client.get("/v1/workspace", headers=workspace.headers)).status_code == 200
        metrics = (await client.get("/metrics")).text
        early_before = counted(metrics, EARLY)
        all_before = counted(metrics, "switchboard_rate_limited_total")

        early = await client.get("/v1/workspace", headers=workspace.headers)
        # A query string is where credential rules apply: the normal path decides it.
        normal = await client.get("/v1/workspace?page_size=1", headers=workspace.headers)
        metrics = (await client.get("/metrics")).text
        assert counted(metrics, EARLY) == early_before + 1
        assert counted(metrics, "switchboard_rate_limited_total") == all_before + 2

    assert early.status_code == normal.status_code == 429
    same_everywhere = {"date", "x-request-id", "content-length", "retry-after", "x-ratelimit-reset"}
    assert set(early.headers) == set(normal.headers)
    for name in set(early.headers) - same_everywhere:
        assert early.headers[name] == normal.headers[name], name
    assert early.headers["x-ratelimit-limit"] == str(RATE)
    assert early.headers["x-ratelimit-remaining"] == "0"
    assert early.headers["retry-after"] == early.headers["x-ratelimit-reset"]
    assert early.headers["cache-control"] == "no-store"
    body, normal_body = early.json(), normal.json()
    assert body["error_code"] == normal_body["error_code"] == "RATE_LIMITED"
    assert body["request_id"] == early.headers["x-request-id"]
    assert body["request_id"] != normal_body["request_id"]
    assert set(body) == set(normal_body)
    # The access log has the same line for both (the path, never a query string).
    request_id = early.headers["x-request-id"]
    await eventually(lambda: request_id in console_log.getvalue())
    line = next(line for line in console_log.getvalue().splitlines() if request_id in line)
    assert "GET /v1/workspace 429" in line


async def test_the_connection_goes_on_after_a_refusal_at_the_head_or_closes_if_asked(
    limited: ServerThread, other_workspace: Workspace
) -> None:
    key = other_workspace.headers["Authorization"]
    request = f"GET /v1/workspace HTTP/1.1\r\nHost: x\r\nAuthorization: {key}\r\n\r\n".encode()
    answered, closed = await raw_exchange(limited, [request] * (RATE + 2))
    statuses = re.findall(rb"HTTP/1.1 (\d+) ", answered)
    assert statuses == [b"200"] * RATE + [b"429", b"429"]
    assert not closed  # kept alive, as after any other response
    health = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    answered, _ = await raw_exchange(limited, [request, health])
    assert re.findall(rb"HTTP/1.1 (\d+) ", answered) == [b"429", b"200"]
    closing = request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    answered, closed = await raw_exchange(limited, [closing])
    assert headers_of(answered)["connection"] == "close"
    assert closed


async def test_what_the_head_cannot_settle_is_refused_by_the_stack_the_same_way(
    limited: ServerThread, workspace: Workspace
) -> None:
    async with httpx.AsyncClient(base_url=limited.url) as client:
        for _ in range(RATE):
            assert (await client.get("/v1/workspace", headers=workspace.headers)).status_code == 200
        before = counted(
            (await client.get("/metrics")).text, "switchboard_rate_limited_early_total"
        )
        created = await client.post(
            "/v1/agents", headers=workspace.headers, json={"name": "refused"}
        )
        with_query = await client.get("/v1/calls?page_size=1", headers=workspace.headers)
        head = await client.head("/v1/workspace", headers=workspace.headers)
        bad_key = await client.get(
            "/v1/workspace", headers={"Authorization": "Bearer pk_live_" + "x" * 40}
        )
        after = counted((await client.get("/metrics")).text, EARLY)
    assert created.status_code == with_query.status_code == 429
    assert created.json()["error_code"] == with_query.json()["error_code"] == "RATE_LIMITED"
    assert head.status_code == 429 and head.content == b""  # a HEAD's answer has no body
    assert bad_key.status_code == 401  # never cached, never refused at the head
    assert after == before  # a body, a query, a HEAD: the normal path answered
