"""SPEC section 6, write timeout: 504 before the response starts, the connection closed after,
and the three stream paths exempt."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import asyncpg
import httpx
import pytest
import uvicorn
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from switchboard.api.middleware import RequestContext, WriteDeadline
from switchboard.ids import new_id
from switchboard.server import bind_socket
from tests.harness import ServerThread, Workspace
from tests.routes import fastapi_app


async def test_a_write_that_has_committed_is_answered_even_past_the_deadline(
    make_server: Callable[..., ServerThread], workspace: Workspace, database_url: str
) -> None:
    """A 504 after the commit would report a write that happened as failed (a phantom write,
    SPEC 6): a request that has begun to commit finishes its answer, late."""
    server = make_server(write_deadline=0.5)
    agent_id = new_id("agt")

    async def slow_after_commit(request: Request) -> dict[str, str]:
        services = request.app.state.services
        workspace_id = request.scope["state"]["principal"].workspace_id
        async with services.database.workspace(workspace_id) as conn:
            await conn.execute(
                "INSERT INTO agents (id, workspace_id, name) VALUES ($1, $2, 'late')",
                agent_id,
                workspace_id,
            )
        await asyncio.sleep(1.0)  # the answer is slow to write; the write has happened
        return {"id": agent_id}

    # A server of its own: the shared one's route table is what other tests walk.
    fastapi_app(server.app).add_api_route("/v1/slow-after-commit", slow_after_commit)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        response = await client.get("/v1/slow-after-commit", headers=workspace.headers)
        assert response.status_code == 200, response.text
        assert response.json() == {"id": agent_id}
        found = await client.get(f"/v1/agents/{agent_id}", headers=workspace.headers)
        assert found.status_code == 200


async def test_a_route_that_overruns_gets_504_and_changes_nothing(
    make_server: Callable[..., ServerThread], workspace: Workspace, database_url: str
) -> None:
    server = make_server(write_deadline=0.5)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        h = workspace.headers
        message = await client.post(
            "/v1/messages",
            headers=h,
            json={
                "channel": "sms",
                "to_number": "+14155550120",
                "from_number": "+14155550121",
                "text": "x",
            },
        )
        conversation_id = message.json()["conversation_id"]
        # Hold the conversation's row lock, so the PATCH waits past its deadline.
        owner = await asyncpg.connect(database_url)
        try:
            async with owner.transaction():
                await owner.execute(
                    "SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", conversation_id
                )
                started = time.monotonic()
                response = await client.patch(
                    f"/v1/conversations/{conversation_id}", headers=h, json={"ai_mode": "human"}
                )
                elapsed = time.monotonic() - started
        finally:
            await owner.close()
        assert response.status_code == 504
        body = response.json()
        assert body["error_code"] == "DEADLINE_EXCEEDED"
        assert response.headers["x-request-id"] == body["request_id"]
        assert 0.5 <= elapsed < 5
        # The handler was cancelled inside its transaction: nothing changed.
        after = await client.get(f"/v1/conversations/{conversation_id}", headers=h)
        assert after.json()["ai_mode"] == "ai"


class StallingApp:
    """An app that starts a response and then stalls, on any path."""

    def __init__(self, stall: float) -> None:
        self.stall = stall

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first part\n", "more_body": True})
        await asyncio.sleep(self.stall)
        await send({"type": "http.response.body", "body": b"done\n"})


@pytest.fixture
def stalling_server() -> Iterator[str]:
    app = RequestContext(WriteDeadline(StallingApp(stall=1.5), seconds=0.3))
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


def test_deadline_after_the_response_started_closes_the_connection(stalling_server: str) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{stalling_server}/v1/calls", timeout=10)


def test_stream_paths_are_free_of_the_deadline(stalling_server: str) -> None:
    for path in (
        "/v1/calls/call_x/transcript/stream",
        "/v1/calls/call_x/stream",
        "/v1/conversations/conv_x/stream",
    ):
        response = httpx.get(f"{stalling_server}{path}", timeout=10)
        assert response.status_code == 200
        assert response.text == "first part\ndone\n"
