"""SPEC section 8 with real receivers on 127.0.0.1: signatures, durability, the retry schedule
on an injected clock, filters, isolation of slow receivers, rotation, URL safety."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import orjson
import pytest
from nats.aio.client import Client
from standardwebhooks import Webhook

from switchboard.bus import connect_bus
from switchboard.db import Database, connect_database
from switchboard.ids import utc_now
from switchboard.producer import Producer
from switchboard.webhooks.router import WebhookRouter
from switchboard.webhooks.safety import UnsafeUrl, check_shape, is_public
from switchboard.webhooks.schedule import DELAYS, JITTER, WINDOW, next_attempt
from switchboard.webhooks.sender import Sender
from tests.harness import ServerThread, Workspace, eventually
from tests.receiver import Receiver
from tests.test_webhook_safety import Rebinding


class Clock:
    def __init__(self) -> None:
        self.now = utc_now()

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def router(
    database_url: str, nats_url: str, workspace: Workspace
) -> AsyncIterator[WebhookRouter]:
    database = await connect_database(database_url, min_size=1, max_size=4)
    bus = await connect_bus(nats_url)
    consumer = WebhookRouter(
        database, bus, durable=f"router-{workspace.id}", filter_subject=f"vb.{workspace.id}.>"
    )
    await consumer.start()
    yield consumer
    await consumer.stop()
    await bus.close()
    await database.close()


@pytest.fixture
async def make_sender(database_url: str) -> AsyncIterator[Callable[..., Any]]:
    made: list[Sender] = []
    database = await connect_database(database_url, min_size=1, max_size=8)

    async def make(**options: Any) -> Sender:
        sender = Sender(database, allow_private=True, **options)
        made.append(sender)
        return sender

    yield make
    for sender in made:
        await sender.stop()
    await database.close()


@pytest.fixture
def receiver() -> Any:
    running = Receiver().start()
    yield running
    running.stop()


async def create_hook(
    client: httpx.AsyncClient, workspace: Workspace, url: str, **fields: Any
) -> dict[str, Any]:
    response = await client.post(
        "/v1/webhooks", headers=workspace.headers, json={"url": url, **fields}
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


async def publish(
    bus: Client, workspace: Workspace, n: int, event_type: str = "call.idle_silence"
) -> list[str]:
    producer = Producer(bus)
    ids = []
    for i in range(n):
        payload: dict[str, Any] = {"silence_ms": 4000 + i, "threshold_ms": 3000}
        if event_type == "call.completed":
            payload = {"status": "completed", "duration_seconds": 1.0, "ended_by": "user"}
        envelope = await producer.event(
            event_type, workspace_id=workspace.id, call_id=f"call_{'w' * 21}{i}", payload=payload
        )
        ids.append(envelope["event_id"])
    return ids


async def pending_deliveries(
    client: httpx.AsyncClient, workspace: Workspace, hook_id: str, n: int
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        body = (
            await client.get(
                f"/v1/webhooks/{hook_id}/deliveries",
                headers=workspace.headers,
                params={"page_size": 100},
            )
        ).json()
        if len(body["deliveries"]) >= n:
            return list(body["deliveries"])
        assert time.monotonic() < deadline, "the router did not write the deliveries"
        await asyncio.sleep(0.05)


async def drain(sender: Sender, clock: Clock | None = None, rounds: int = 1) -> None:
    for _ in range(rounds):
        await sender.run_once()
        await sender.wait_idle()


def plain_hmac_ok(
    secret: str, headers: dict[str, str], body: bytes, name: str = "x-voicebip-signature"
) -> bool:
    lowered = {k.lower(): v for k, v in headers.items()}
    expected = hmac.new(
        secret.encode(), f"{lowered['x-voicebip-timestamp']}.".encode() + body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(lowered[name], f"sha256={expected}")


# --- signatures ---------------------------------------------------------------------------------


async def test_a_delivery_verifies_with_standard_webhooks_and_plain_hmac(
    client: httpx.AsyncClient,
    workspace: Workspace,
    bus: Client,
    router: WebhookRouter,
    make_sender: Callable[..., Any],
    receiver: Receiver,
) -> None:
    hook = await create_hook(client, workspace, receiver.url)
    assert hook["secret"].startswith("whsec_")
    assert (
        "secret"
        not in (await client.get(f"/v1/webhooks/{hook['id']}", headers=workspace.headers)).json()
    )
    [event_id] = await publish(bus, workspace, 1)
    await pending_deliveries(client, workspace, hook["id"], 1)
    sender = await make_sender()
    await drain(sender)
    [got] = await asyncio.to_thread(receiver.wait_for, 1)
    envelope = Webhook(hook["secret"]).verify(got.body, got.headers)
    assert envelope["event_id"] == event_id and envelope["event_type"] == "call.idle_silence"
    assert plain_hmac_ok(hook["secret"], got.headers, got.body)
    assert got.headers["X-Voicebip-Event-ID"] == event_id
    assert abs(int(got.headers["X-Voicebip-Timestamp"]) - time.time()) < 60
    assert "X-Voicebip-Signature-Previous" not in got.headers
    deliveries = await pending_deliveries(client, workspace, hook["id"], 1)
    assert deliveries[0]["status"] == "succeeded"
    [attempt] = deliveries[0]["attempts"]
    assert (
        attempt["status_code"] == 200
        and attempt["latency_ms"] >= 0
        and attempt["next_attempt_at"] is None
    )


# --- durability ---------------------------------------------------------------------------------


async def test_a_receiver_that_is_down_then_up_gets_every_event(
    client: httpx.AsyncClient,
    workspace: Workspace,
    bus: Client,
    router: WebhookRouter,
    make_sender: Callable[..., Any],
) -> None:
    down = Receiver().start()
    port = down.port
    down.stop()  # nothing listens on the port now
    hook = await create_hook(client, workspace, f"http://127.0.0.1:{port}/hook")
    ids = await publish(bus, workspace, 5)
    await pending_deliveries(client, workspace, hook["id"], 5)
    clock = Clock()
    sender = await make_sender(clock=clock)
    await drain(sender, rounds=2)  # refused; nothing is due again yet
    deliveries = await pending_deliveries(client, workspace, hook["id"], 5)
    assert all(d["status"] == "pending" and len(d["attempts"]) == 1 for d in deliveries)
    assert all(d["attempts"][0]["error"] for d in deliveries)
    up = Receiver(port=port).start()
    try:
        clock.now += timedelta(minutes=1)
        await drain(sender)
        got = await asyncio.to_thread(up.wait_for, 5)
        assert {orjson.loads(r.body)["event_id"] for r in got} == set(ids)
    finally:
        up.stop()


async def test_sigkill_with_deliveries_pending_loses_nothing(
    client: httpx.AsyncClient,
    workspace: Workspace,
    bus: Client,
    database_url: str,
    nats_url: str,
) -> None:
    """A whole `serve` (router and sender) is killed with work pending; after a restart every
    event arrives."""
    down = Receiver().start()
    port = down.port
    down.stop()
    hook = await create_hook(client, workspace, f"http://127.0.0.1:{port}/hook")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(
        SWITCHBOARD_DATABASE_URL=database_url,
        SWITCHBOARD_NATS_URL=nats_url,
        SWITCHBOARD_WEBHOOK_ALLOW_PRIVATE="true",
    )
    argv = [sys.executable, "-m", "switchboard", "serve", "--port", "0"]
    quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    serve = subprocess.Popen(argv, **quiet)  # noqa: ASYNC220
    try:
        ids = await publish(bus, workspace, 4)
        deadline = time.monotonic() + 20
        while True:  # until the doomed server has routed them and failed a first attempt
            deliveries = await pending_deliveries(client, workspace, hook["id"], 0)
            if len(deliveries) == 4 and all(d["attempts"] for d in deliveries):
                break
            assert time.monotonic() < deadline, "the server never attempted the deliveries"
            await asyncio.sleep(0.1)
    finally:
        serve.send_signal(signal.SIGKILL)
        serve.wait(10)
    up = Receiver(port=port).start()
    restarted = subprocess.Popen(argv, **quiet)  # noqa: ASYNC220
    try:
        # The restarted server retries on its own schedule (the first retry is due ~5 s later).
        got = await asyncio.to_thread(up.wait_for, 4, 30.0)
        assert {orjson.loads(r.body)["event_id"] for r in got} == set(ids)
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(30)
        up.stop()


# --- the schedule -------------------------------------------------------------------------------


async def test_retry_schedule_on_an_injected_clock_ends_in_failure_after_24_hours(
    client: httpx.AsyncClient,
    workspace: Workspace,
    bus: Client,
    router: WebhookRouter,
    make_sender: Callable[..., Any],
    receiver: Receiver,
) -> None:
    receiver.status = 500
    hook = await create_hook(client, workspace, receiver.url)
    await publish(bus, workspace, 1)
    await pending_deliveries(client, workspace, hook["id"], 1)
    clock = Clock()
    start = clock.now
    sender = await make_sender(clock=clock)
    for _ in range(30):
        await drain(sender)
        [delivery] = await pending_deliveries(client, workspace, hook["id"], 1)
        if delivery["status"] != "pending":
            break
        # The API shows milliseconds; the stored time has microseconds: step just past it.
        due = datetime.fromisoformat(delivery["next_attempt_at"].replace("Z", "+00:00"))
        clock.now = due + timedelta(milliseconds=1)
    assert delivery["status"] == "failed"
    times = [
        datetime.fromisoformat(a["attempted_at"].replace("Z", "+00:00")) - start
        for a in delivery["attempts"]
    ]
    slack = timedelta(milliseconds=5)  # the API's millisecond rounding, and our 1 ms step
    assert abs(times[0]) < slack
    for n in range(1, len(times) - 1):
        gap, nominal = times[n] - times[n - 1], DELAYS[min(n, len(DELAYS)) - 1]
        assert nominal * (1 - JITTER) - slack <= gap <= nominal * (1 + JITTER) + slack, (n, gap)
    # 0, 5 s, 35 s, ~2.6 min, ... ~15.7 h, ~23.7 h (unless jitter pushed it past 24 h), 24 h
    assert len(times) in (11, 12)
    assert abs(times[-1] - WINDOW) < timedelta(milliseconds=5)  # the final attempt at 24 h
    assert all(a["status_code"] == 500 for a in delivery["attempts"])
    assert len(receiver.received) == len(times)


def test_schedule_honours_retry_after_and_the_window() -> None:
    first = utc_now()
    assert next_attempt(first, 1, first, retry_after=timedelta(minutes=3)) == first + timedelta(
        minutes=3
    )
    late = first + WINDOW - timedelta(seconds=1)
    assert next_attempt(first, 9, late) == first + WINDOW
    assert next_attempt(first, 10, first + WINDOW) is None


# --- filters and isolation of slow receivers ----------------------------------------------------


async def test_filters_and_a_hanging_receiver_does_not_delay_a_healthy_one(
    client: httpx.AsyncClient,
    workspace: Workspace,
    bus: Client,
    router: WebhookRouter,
    make_sender: Callable[..., Any],
) -> None:
    healthy, hanging, picky = Receiver().start(), Receiver(hang=3.0).start(), Receiver().start()
    try:
        await create_hook(client, workspace, healthy.url)
        await create_hook(client, workspace, hanging.url)
        await create_hook(client, workspace, picky.url, event_types=["call.completed"])
        await publish(bus, workspace, 6)
        await publish(bus, workspace, 1, event_type="call.completed")
        sender = await make_sender(per_endpoint=2, attempt_timeout=1.0, poll_interval=0.05)
        await sender.start()
        started = time.monotonic()
        await asyncio.to_thread(healthy.wait_for, 7)
        assert time.monotonic() - started < 2.0, "the healthy receiver waited on the hanging one"
        [only] = await asyncio.to_thread(picky.wait_for, 1)
        assert orjson.loads(only.body)["event_type"] == "call.completed"
        assert len(picky.received) == 1
    finally:
        for r in (healthy, hanging, picky):
            r.stop()


# --- rotation -------------------------------------------------------------------------------------


async def test_rotation_signs_with_both_secrets_for_24_hours_then_only_the_new(
    client: httpx.AsyncClient,
    workspace: Workspace,
    bus: Client,
    router: WebhookRouter,
    make_sender: Callable[..., Any],
    receiver: Receiver,
) -> None:
    hook = await create_hook(client, workspace, receiver.url)
    old = hook["secret"]
    rotated = await client.post(
        f"/v1/webhooks/{hook['id']}/rotate-secret", headers=workspace.headers
    )
    new = rotated.json()["secret"]
    assert new != old and rotated.json()["secret_rotated_until"] is not None
    await publish(bus, workspace, 1)
    await pending_deliveries(client, workspace, hook["id"], 1)
    clock = Clock()
    sender = await make_sender(clock=clock)
    await drain(sender)
    [during] = await asyncio.to_thread(receiver.wait_for, 1)
    for secret in (old, new):
        Webhook(secret).verify(during.body, during.headers)
    assert plain_hmac_ok(new, during.headers, during.body)
    assert plain_hmac_ok(old, during.headers, during.body, "x-voicebip-signature-previous")
    # A day later, only the new secret signs.
    clock.now += timedelta(hours=24, minutes=1)
    await publish(bus, workspace, 1)
    await pending_deliveries(client, workspace, hook["id"], 2)
    await drain(sender)
    after = (await asyncio.to_thread(receiver.wait_for, 2))[1]
    assert "X-Voicebip-Signature-Previous" not in after.headers
    with pytest.raises(Exception):  # noqa: B017 - any verification failure will do
        Webhook(old).verify(after.body, after.headers)
    assert plain_hmac_ok(new, after.headers, after.body)


# --- safety and the API ---------------------------------------------------------------------------


async def test_private_urls_are_refused_unless_allowed(
    make_server: Callable[..., ServerThread], workspace: Workspace
) -> None:
    strict = make_server(webhook_allow_private=False)
    async with httpx.AsyncClient(base_url=strict.url, timeout=10) as http:
        for url in (
            "http://127.0.0.1:8080/x",
            "http://10.0.0.7/x",
            "http://169.254.169.254/latest",
            "ftp://example.com/x",
            "http://user:pw@example.com/",
        ):
            response = await http.post("/v1/webhooks", headers=workspace.headers, json={"url": url})
            assert response.status_code == 400 and "url" in response.json()["message"], url
        bad_filter = await http.post(
            "/v1/webhooks",
            headers=workspace.headers,
            json={"url": "http://127.0.0.1/x", "event_types": ["call.nope"]},
        )
        assert bad_filter.status_code == 400 and "event_types" in bad_filter.json()["message"]
    assert not is_public("192.168.1.1") and not is_public("::1") and is_public("93.184.216.34")
    with pytest.raises(UnsafeUrl):
        check_shape("javascript:alert(1)")


async def test_webhook_crud_test_endpoint_and_redeliver(
    client: httpx.AsyncClient,
    workspace: Workspace,
    bus: Client,
    router: WebhookRouter,
    make_sender: Callable[..., Any],
    receiver: Receiver,
) -> None:
    h = workspace.headers
    hook = await create_hook(client, workspace, receiver.url, event_types=["call.idle_silence"])
    listed = (await client.get("/v1/webhooks", headers=h)).json()["webhooks"]
    assert [w["id"] for w in listed] == [hook["id"]] and listed[0]["event_types"] == [
        "call.idle_silence"
    ]
    patched = await client.patch(
        f"/v1/webhooks/{hook['id']}", headers=h, json={"enabled": False, "event_types": None}
    )
    assert patched.json()["enabled"] is False and patched.json()["event_types"] is None
    await client.patch(f"/v1/webhooks/{hook['id']}", headers=h, json={"enabled": True})
    tested = await client.post("/v1/webhooks/test", headers=h, json={"webhook_id": hook["id"]})
    assert tested.json()["ok"] is True and tested.json()["status_code"] == 200
    [sample] = await asyncio.to_thread(receiver.wait_for, 1)
    assert (
        Webhook(hook["secret"]).verify(sample.body, sample.headers)["event_type"]
        == "call.completed"
    )
    # A failed delivery can be redelivered.
    receiver.status = 500
    await publish(bus, workspace, 1)
    [delivery] = await pending_deliveries(client, workspace, hook["id"], 1)
    clock = Clock()
    sender = await make_sender(clock=clock)
    await drain(sender)  # the first attempt fails...
    clock.now += WINDOW  # ...and a day later, so does the last
    await drain(sender)
    [delivery] = await pending_deliveries(client, workspace, hook["id"], 1)
    assert delivery["status"] == "failed"
    receiver.status = 200
    again = await client.post(
        f"/v1/webhooks/{hook['id']}/deliveries/{delivery['id']}/redeliver", headers=h
    )
    assert again.status_code == 200 and again.json()["status"] == "pending"
    assert len(again.json()["attempts"]) == 2  # the log keeps the failed attempts
    clock.now = utc_now() + timedelta(seconds=1)
    await drain(sender)
    [delivery] = await pending_deliveries(client, workspace, hook["id"], 1)
    assert delivery["status"] == "succeeded" and len(delivery["attempts"]) == 3
    assert (await client.delete(f"/v1/webhooks/{hook['id']}", headers=h)).status_code == 204
    assert (await client.get(f"/v1/webhooks/{hook['id']}", headers=h)).status_code == 404


async def test_a_disabled_endpoint_is_not_attempted_until_enabled(
    client: httpx.AsyncClient,
    workspace: Workspace,
    bus: Client,
    router: WebhookRouter,
    make_sender: Callable[..., Any],
    receiver: Receiver,
) -> None:
    hook = await create_hook(client, workspace, receiver.url)
    await publish(bus, workspace, 1)
    await pending_deliveries(client, workspace, hook["id"], 1)
    await client.patch(
        f"/v1/webhooks/{hook['id']}", headers=workspace.headers, json={"enabled": False}
    )
    sender = await make_sender()
    await drain(sender)
    [delivery] = await pending_deliveries(client, workspace, hook["id"], 1)
    assert delivery["status"] == "pending" and delivery["attempts"] == [] and not receiver.received
    await client.patch(
        f"/v1/webhooks/{hook['id']}", headers=workspace.headers, json={"enabled": True}
    )
    await drain(sender)
    await asyncio.to_thread(receiver.wait_for, 1)


# --- the address that was checked -----------------------------------------------------------


async def test_a_delivery_goes_to_the_address_the_sender_checked(
    client: httpx.AsyncClient,
    workspace: Workspace,
    bus: Client,
    router: WebhookRouter,
    make_sender: Callable[..., Any],
    receiver: Receiver,
) -> None:
    """The sender resolves through its injected resolver once per attempt and connects to that
    answer: a name answering 127.0.0.1 (the receiver), then ::1, gets the POST on 127.0.0.1."""
    name = "hooks.rebind.test"
    resolver = Rebinding(["127.0.0.1"])
    hook = await create_hook(client, workspace, f"http://{name}:{receiver.port}/hook")
    await publish(bus, workspace, 1)
    await pending_deliveries(client, workspace, hook["id"], 1)
    sender = await make_sender(resolve=resolver)
    await drain(sender)
    [got] = await asyncio.to_thread(receiver.wait_for, 1)
    assert got.headers["Host"] == f"{name}:{receiver.port}"
    assert resolver.questions == [(name, receiver.port)]
    [delivery] = await pending_deliveries(client, workspace, hook["id"], 1)
    assert delivery["status"] == "succeeded"


# --- outages ----------------------------------------------------------------------------------


class Cable:
    """A TCP hop in front of the real Postgres that a test can cut and mend: what an outage
    looks like from a client (its connections drop, new ones are closed at once), without
    stopping the Postgres every other test shares. Counts the connections it turned away."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.cut = False
        self.turned_away = 0
        self._links: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> Cable:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, database_url: str) -> str:
        parts = urlsplit(database_url)
        netloc = parts.netloc.rsplit(":", 1)[0] + f":{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def sever(self) -> None:
        self.cut = True
        for writer in self._links:
            writer.transport.abort()
        self._links.clear()

    def mend(self) -> None:
        self.cut = False

    async def stop(self) -> None:
        self.sever()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            self.turned_away += 1
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._links |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()


@pytest.fixture
async def cable(database_url: str) -> AsyncIterator[Cable]:
    running = await Cable(urlsplit(database_url).port or 5432).start()
    yield running
    await running.stop()


@pytest.fixture
async def database_via_cable(cable: Cable, database_url: str) -> AsyncIterator[Database]:
    """A pool through the cable. As the owner: connect_database would also prepare the database
    (the application role's password among it), which is the serving path's business, not this
    test's; the sender's queries read the same either way."""
    pool = await asyncpg.create_pool(cable.url(database_url), min_size=1, max_size=2)
    yield Database(pool, b"")
    await pool.close()


async def test_a_database_outage_logs_one_line_not_a_traceback_per_iteration(
    cable: Cable, database_via_cable: Database, caplog: pytest.LogCaptureFixture
) -> None:
    sender = Sender(database_via_cable, poll_interval=0.01)
    caplog.set_level(logging.INFO, logger="switchboard.webhooks.sender")
    try:
        await sender.start()
        cable.sever()
        await eventually(lambda: cable.turned_away >= 20)  # 20 iterations failed
        lines = [r for r in caplog.records if r.name == "switchboard.webhooks.sender"]
        assert [r.getMessage() for r in lines] == [
            lines[0].getMessage()
        ] and "unavailable" in lines[0].getMessage(), [r.getMessage() for r in lines]
        assert all(r.exc_info is None for r in lines)
        cable.mend()
        await eventually(lambda: any("available again" in r.getMessage() for r in caplog.records))
    finally:
        await sender.stop()


class HeldReceiver:
    """A receiver on 127.0.0.1 that holds each request until released, and says when one has
    arrived: so a test can act while an attempt is in flight."""

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.release = threading.Event()
        held = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                held.arrived.set()
                held.release.wait(10)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


async def test_an_outage_during_an_attempt_logs_one_line_and_keeps_the_delivery(
    client: httpx.AsyncClient,
    workspace: Workspace,
    bus: Client,
    router: WebhookRouter,
    cable: Cable,
    database_via_cable: Database,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The POST went out but its attempt cannot be recorded: the failure is logged once (the
    task that hit it has nobody awaiting it), and the delivery stays leased, to be retried."""
    held = HeldReceiver()
    sender = Sender(database_via_cable, allow_private=True)
    caplog.set_level(logging.INFO, logger="switchboard.webhooks.sender")
    try:
        hook = await create_hook(client, workspace, held.url)
        await publish(bus, workspace, 1)
        await pending_deliveries(client, workspace, hook["id"], 1)
        assert await sender.run_once() >= 1  # ours, and any due delivery of an earlier test
        assert await asyncio.to_thread(held.arrived.wait, 10)
        cable.sever()
        held.release.set()
        await sender.wait_idle()
        lines = [r for r in caplog.records if r.name == "switchboard.webhooks.sender"]
        assert len(lines) == 1 and "unavailable" in lines[0].getMessage(), lines
        assert lines[0].exc_info is None
        [delivery] = await pending_deliveries(client, workspace, hook["id"], 1)
        assert delivery["status"] == "pending" and delivery["attempts"] == []
    finally:
        held.stop()
        await sender.stop()
