"""The console (issue 11) in Debian's Chromium, driven by Playwright, with the simulator playing:
the live board pushed by the workspace stream, a call opened mid-way and after its end, a
human reply in a conversation, a webhook's failed delivery redelivered, a key created and
revoked from the page, and every view at 390 px. One browser for the module; every page is
checked for console errors. Screenshots go to test-artifacts/."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from nats.aio.client import Client
from playwright.async_api import Browser, ConsoleMessage, Page

from switchboard.bus import connect_bus
from switchboard.db import connect_database
from switchboard.producer import Producer
from switchboard.simulate import SimulationPlan, Simulator
from switchboard.webhooks.router import WebhookRouter
from switchboard.webhooks.sender import Sender
from tests.browser import ARTIFACTS, BROWSER_TESTS
from tests.harness import ServerThread, Workspace, eventually, new_workspace
from tests.receiver import Receiver
from tests.test_dashboard import CuttableProxy
from tests.test_producers import WorkspaceRecorder

WAIT = 15000  # ms, for the browser

pytestmark = BROWSER_TESTS


@pytest.fixture(scope="module")
async def console_workspace(database_url: str, nats_url: str) -> AsyncIterator[Workspace]:
    """A workspace of this module's own, with a recorder writing its calls, turns and messages
    (the test server runs the API role only)."""
    workspace = await new_workspace(database_url, "Console test")
    recorder = WorkspaceRecorder(database_url, nats_url, workspace.id)
    await recorder.start()
    yield workspace
    await recorder.stop()


class Console:
    """A signed-in tab and the console errors it logged."""

    def __init__(self, page: Page, url: str) -> None:
        self.page = page
        self.url = url
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning") and "AudioContext" not in message.text:
            self.errors.append(f"{message.type}: {message.text} {message.location}")

    async def open(self, hash_path: str) -> None:
        await self.page.goto(f"{self.url}/{hash_path}")

    async def shot(self, name: str) -> None:
        await self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    async def no_horizontal_scroll(self) -> None:
        width = await self.page.evaluate("document.scrollingElement.scrollWidth")
        viewport = self.page.viewport_size
        assert viewport is not None
        assert width <= viewport["width"], f"{width} px wide at {viewport['width']}"


async def sign_in(page: Page, url: str, key: str) -> None:
    await page.goto(url + "/")
    await page.fill("#api-key", key)
    await page.click("#sign-in")
    await page.wait_for_selector("#live-calls", state="attached")


@pytest.fixture
async def console(
    browser: Browser, server: ServerThread, console_workspace: Workspace
) -> AsyncIterator[Console]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(WAIT)
    tab = Console(page, server.url)
    await sign_in(page, server.url, console_workspace.key)
    yield tab
    await context.close()
    assert tab.errors == [], tab.errors


@pytest.fixture
async def simulator(bus: Client, console_workspace: Workspace) -> AsyncIterator[Simulator]:
    """The simulator, playing the calls the tests place through the API, in real time."""
    playing = Simulator(
        bus, SimulationPlan(console_workspace.id, calls=0, conversations=0, seed=7, pace=1.0)
    )
    await playing.start()
    yield playing
    await playing.stop()


async def place_call(
    client: httpx.AsyncClient, workspace: Workspace, transport: str = "sip"
) -> str:
    placed = await client.post(
        "/v1/calls",
        headers=workspace.headers,
        json={"to_number": "+14155550170", "from_number": "+14155550171", "transport": transport},
    )
    assert placed.status_code == 201, placed.text
    return str(placed.json()["id"])


async def stored_turns(client: httpx.AsyncClient, workspace: Workspace, call_id: str) -> Any:
    response = await client.get(f"/v1/calls/{call_id}", headers=workspace.headers)
    return response.json()["turns"]


async def test_the_board_is_pushed_live_and_its_timer_runs(
    console: Console,
    client: httpx.AsyncClient,
    console_workspace: Workspace,
    simulator: Simulator,
    bus: Client,
) -> None:
    page = console.page
    await page.wait_for_selector("#connection[data-state=live]")
    call_id = await place_call(client, console_workspace)
    row = page.locator(f"#live-calls li[data-id={call_id}]")
    await row.wait_for()  # pushed: no reload, no polling
    assert "+14155550171 → +14155550170" in await row.inner_text()
    timer = row.locator(".timer")
    first = int(await timer.get_attribute("data-seconds") or 0)

    async def later() -> bool:
        return int(await timer.get_attribute("data-seconds") or 0) > first

    await eventually(later, within=5)
    # A quality dip turns the badge amber (or red when it is far past the threshold).
    await Producer(bus).event(
        "call.quality_degraded",
        workspace_id=console_workspace.id,
        call_id=call_id,
        payload={"metric": "packet_loss", "value": 3.2, "threshold": 2.0},
    )
    await row.locator(".badge[data-quality=poor]").wait_for()
    await page.locator("#count-live", has_text="1").wait_for()
    # A conversation starts: it shows with its channel, mode and last message.
    sent = await client.post(
        "/v1/messages",
        headers=console_workspace.headers,
        json={
            "channel": "sms",
            "to_number": "+14155550172",
            "from_number": "+14155550000",
            "text": "Your table for two is booked",
        },
    )
    conversation_id = sent.json()["conversation_id"]
    conversation = page.locator(f"#conversations li[data-id={conversation_id}]")
    await conversation.filter(has_text="Your table for two is booked").wait_for()
    assert "sms" in await conversation.inner_text()
    await console.shot("board-live")
    # The call ends: it leaves the live list for the recent ones, with its status and duration.
    await client.delete(f"/v1/calls/{call_id}", headers=console_workspace.headers)
    ended = page.locator(f"#ended-calls li[data-id={call_id}]")
    await ended.filter(has_text="completed").wait_for()
    await row.wait_for(state="detached")

    async def counted() -> bool:  # initiated, the dip, the message, the end at least
        return int(await page.locator("#count-rate").inner_text()) >= 4

    await eventually(counted, within=5)
    await console.shot("board-ended")


async def test_a_call_opened_mid_way_shows_what_came_before_and_its_summary_after(
    console: Console,
    client: httpx.AsyncClient,
    console_workspace: Workspace,
    simulator: Simulator,
    bus: Client,
) -> None:
    page = console.page
    call_id = await place_call(client, console_workspace, transport="esl")

    async def two_turns() -> Any:
        turns = await stored_turns(client, console_workspace, call_id)
        return turns if len(turns) >= 2 else None

    before = await eventually(two_turns, within=30)  # said before the view opens
    await console.open(f"#/calls/{call_id}")
    for turn in before:
        await page.locator(f"#turn-{turn['id']}.final").filter(has_text=turn["text"]).wait_for()
    await page.wait_for_selector("#transcript-state[data-state=live]")
    await page.wait_for_selector("#call-status[data-state=live]")
    # Barge-ins, silences, quality dips and DTMF sit inline on the transcript's timeline.
    producer = Producer(bus)
    for event_type, payload in (
        ("call.idle_silence", {"silence_ms": 4321, "threshold_ms": 3000}),
        ("call.quality_degraded", {"metric": "jitter", "value": 77.7, "threshold": 30}),
    ):
        await producer.event(
            event_type, workspace_id=console_workspace.id, call_id=call_id, payload=payload
        )
    await page.locator("#transcript .marker.idle_silence", has_text="4.3 s").wait_for()
    await page.locator("#transcript .marker.quality_degraded", has_text="jitter 77.7").wait_for()
    await page.wait_for_selector("#socket-state[data-state=live]")
    await page.click("button[data-digit='7']")
    await page.locator("#dtmf-results li.ok", has_text="7: ok").wait_for()
    await page.locator("#transcript .marker.dtmf_sent", has_text="7").wait_for()
    # The event list is readable, with the raw envelope one click away.
    silence = page.locator("#timeline li.call-idle_silence", has_text="4.3 s")
    assert "4.3 s of silence" in await silence.inner_text()
    await silence.locator("summary").click()
    assert '"silence_ms": 4321' in await silence.locator("pre").inner_text()
    await console.shot("call-live")
    # Hung up: the summary, the keypad off.
    await client.delete(f"/v1/calls/{call_id}", headers=console_workspace.headers)
    summary = page.locator("#call-summary")
    await summary.filter(has_text="api").wait_for()
    assert "completed" in await summary.inner_text()
    await page.wait_for_selector("#call-status[data-state=ended]")
    await page.wait_for_selector("button[data-digit='1'][disabled]")
    assert "ended" in await page.inner_text("#keypad-note")
    # Opened after its end: every stored turn, and the summary with its quality.
    stored = await stored_turns(client, console_workspace, call_id)
    await page.reload()
    await page.locator("#call-summary", has_text="completed").wait_for()
    await page.wait_for_selector("#transcript-state[data-state=ended]")
    shown = await page.locator("#transcript .turn.final .text").all_inner_texts()
    assert shown == [turn["text"] for turn in stored]
    await page.locator("#transcript .marker.idle_silence", has_text="4.3 s").wait_for()
    await page.wait_for_selector("button[data-digit='1'][disabled]")
    await console.shot("call-ended")


async def test_a_human_reply_appears_in_the_conversation(
    console: Console, client: httpx.AsyncClient, console_workspace: Workspace
) -> None:
    page = console.page
    sent = await client.post(
        "/v1/messages",
        headers=console_workspace.headers,
        json={
            "channel": "whatsapp",
            "to_number": "+14155550173",
            "from_number": "+14155550000",
            "text": "Is my order on its way?",
        },
    )
    conversation_id = sent.json()["conversation_id"]
    await console.open(f"#/conversations/{conversation_id}")
    await page.wait_for_selector("#conversation-state[data-state=live]")
    assert "Is my order on its way?" in await page.inner_text("#messages")
    assert await page.locator("#reply-send").is_disabled()  # the AI answers
    await page.click("#mode-human")
    await page.locator("#mode", has_text="human").wait_for()
    await page.locator("#messages li.mode-change", has_text="AI → human").wait_for()
    await page.fill("#reply-text", "It left the depot this morning")
    await page.click("#reply-send")
    await page.locator("#messages li.msg.out", has_text="It left the depot this morning").wait_for()
    assert await page.input_value("#reply-text") == ""
    await console.shot("conversation-human")


@pytest.fixture
async def webhook_delivery(
    database_url: str, nats_url: str, console_workspace: Workspace
) -> AsyncIterator[None]:
    """This workspace's webhook router and a sender, on the real clock."""
    database = await connect_database(database_url, min_size=1, max_size=4)
    bus = await connect_bus(nats_url)
    router = WebhookRouter(
        database,
        bus,
        durable=f"router-{console_workspace.id}",
        filter_subject=f"vb.{console_workspace.id}.>",
    )
    await router.start()
    sender = Sender(database, allow_private=True)
    await sender.start()
    yield
    await sender.stop()
    await router.stop()
    await bus.close()
    await database.close()


async def test_a_failed_delivery_is_redelivered_from_the_page(
    console: Console,
    console_workspace: Workspace,
    bus: Client,
    database_url: str,
    webhook_delivery: None,
) -> None:
    page = console.page
    receiver = Receiver(status=500).start()
    try:
        await console.open("#/webhooks")
        await page.fill("#webhook-url", receiver.url)
        await page.locator("details.filter summary").click()
        await page.check("input[value='call.idle_silence']")
        await page.click("#webhook-add")
        secret = await page.locator("#webhook-secret").input_value()
        assert secret.startswith("whsec_") or len(secret) > 20
        endpoint = page.locator("li.endpoint").filter(has_text=receiver.url)
        assert "only call.idle_silence" in await endpoint.inner_text()
        # A test send reports the receiver's answer.
        await endpoint.locator("button.test").click()
        await endpoint.locator(".test-result.error", has_text="HTTP 500").wait_for()
        # A real event fails its first attempt...
        await Producer(bus).event(
            "call.idle_silence",
            workspace_id=console_workspace.id,
            call_id="call_" + "c" * 22,
            payload={"silence_ms": 5000, "threshold_ms": 3000},
        )
        await endpoint.locator("button.log-toggle").click()
        attempt = endpoint.locator("ol.attempts li.error", has_text="HTTP 500")

        async def failed_once() -> bool:
            if await attempt.count():
                return True
            await endpoint.locator("button.refresh").click()
            return False

        await eventually(failed_once, within=15)
        assert "next try" in await attempt.first.inner_text()
        # ...and after its 24 hours (made to pass here) it is failed.
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "UPDATE webhook_deliveries SET status = 'failed', "
                "next_attempt_at = now() + interval '1 day' WHERE workspace_id = $1",
                console_workspace.id,
            )
        finally:
            await conn.close()
        await endpoint.locator("button.refresh").click()
        delivery = endpoint.locator("li.delivery[data-status=failed]")
        await delivery.wait_for()
        await console.shot("webhooks-failed")
        receiver.status = 200
        await delivery.locator("button.redeliver").click()
        await endpoint.locator("li.delivery[data-status=succeeded]").wait_for(timeout=20000)
        done = endpoint.locator("li.delivery[data-status=succeeded]")
        assert await done.locator("ol.attempts li.ok", has_text="HTTP 200").count() == 1
        # Its filter edited: every event type.
        await endpoint.locator("button.edit-filter").click()
        await endpoint.locator("input[value='call.idle_silence']").uncheck()
        await endpoint.locator("button", has_text="Save filter").click()
        await endpoint.locator("text=every event type").wait_for()
        # Disabled, then enabled again; rotated, the new secret shown once.
        await endpoint.locator("button.toggle").click()
        await endpoint.locator(".badge[data-enabled=false]").wait_for()
        await endpoint.locator("button.toggle").click()
        await endpoint.locator(".badge[data-enabled=true]").wait_for()
        await endpoint.locator("button.rotate").click()
        await endpoint.locator("button.danger", has_text="Rotate now").click()
        rotated = await endpoint.locator("input.secret").input_value()
        assert rotated != secret
        await endpoint.locator("text=previous secret signs until").wait_for()
        await console.shot("webhooks")
    finally:
        receiver.stop()


async def test_a_key_made_on_the_page_works_and_revoking_it_ends_its_streams(
    console: Console, server: ServerThread, client: httpx.AsyncClient
) -> None:
    page = console.page
    await console.open("#/keys")
    await page.fill("#key-name", "wallboard")
    await page.click("#key-add")
    new_key = await page.locator("#new-key-secret").input_value()
    assert new_key.startswith("pk_live_")
    headers = {"Authorization": f"Bearer {new_key}"}
    assert (await client.get("/v1/workspace", headers=headers)).status_code == 200
    frames: list[str] = []
    opened = asyncio.Event()

    async def watch() -> None:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=30) as http,
            http.stream("GET", "/v1/events/stream", headers=headers) as response,
        ):
            assert response.status_code == 200
            opened.set()
            async for line in response.aiter_lines():
                frames.append(line)

    stream = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(opened.wait(), 10)
        row = page.locator("#keys li").filter(has_text="wallboard")
        await row.locator("button.revoke").click()
        warning = row.locator("[role=alertdialog]")
        assert "ends now" in await warning.inner_text()
        await console.shot("keys-revoke-warning")
        await row.locator("button.confirm-revoke").click()
        await row.locator(".badge", has_text="revoked").wait_for()
        await asyncio.wait_for(stream, 10)  # the stream opened with it ended
        assert any("UNAUTHENTICATED" in frame for frame in frames), frames
        assert (await client.get("/v1/workspace", headers=headers)).status_code == 401
        await console.shot("keys")
    finally:
        if not stream.done():
            stream.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stream


async def test_every_view_fits_a_phone(
    browser: Browser,
    server: ServerThread,
    console_workspace: Workspace,
    client: httpx.AsyncClient,
    simulator: Simulator,
) -> None:
    context = await browser.new_context(
        viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True
    )
    page = await context.new_page()
    page.set_default_timeout(WAIT)
    phone = Console(page, server.url)
    try:
        text = "Can I bring my dog to the appointment on Friday afternoon?"
        sent = await client.post(
            "/v1/messages",
            headers=console_workspace.headers,
            json={
                "channel": "sms",
                "to_number": "+14155550174",
                "from_number": "+14155550000",
                "text": text,
            },
        )
        await sign_in(page, server.url, console_workspace.key)
        await page.locator("#conversations li", has_text=text).wait_for()  # read from REST
        call_id = await place_call(client, console_workspace, transport="webrtc")
        await page.locator(f"#live-calls li[data-id={call_id}]").wait_for()
        await phone.no_horizontal_scroll()
        await phone.shot("phone-board")
        await phone.open(f"#/calls/{call_id}")
        await page.locator("#transcript .turn").first.wait_for(timeout=20000)
        await phone.no_horizontal_scroll()
        await phone.shot("phone-call")
        await phone.open(f"#/conversations/{sent.json()['conversation_id']}")
        await page.wait_for_selector("#conversation-state[data-state=live]")
        await phone.no_horizontal_scroll()
        await phone.shot("phone-conversation")
        await phone.open("#/webhooks")
        await page.locator("#webhooks li").first.wait_for()
        await phone.no_horizontal_scroll()
        await phone.shot("phone-webhooks")
        await phone.open("#/keys")
        await page.locator("#keys li").first.wait_for()
        await phone.no_horizontal_scroll()
        await phone.shot("phone-keys")
        # By keyboard: a new view has the focus on its content; the navigation is just before.
        for _ in range(6):
            await page.keyboard.press("Shift+Tab")
            if await page.evaluate("document.activeElement.textContent") == "Board":
                break
        await page.keyboard.press("Enter")
        await page.locator("#live-calls li").first.wait_for()
        await client.delete(f"/v1/calls/{call_id}", headers=console_workspace.headers)
    finally:
        await context.close()
    assert phone.errors == [], phone.errors


async def test_the_board_says_when_it_reconnects_and_recovers_what_it_missed(
    browser: Browser,
    server: ServerThread,
    console_workspace: Workspace,
    client: httpx.AsyncClient,
) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    page.set_default_timeout(WAIT)
    tab = Console(page, server.url)
    try:
        async with CuttableProxy(server.url) as proxy:
            await sign_in(page, proxy.url, console_workspace.key)
            await page.wait_for_selector("#connection[data-state=live]")
            first = await place_call(client, console_workspace)
            await page.locator(f"#live-calls li[data-id={first}]").wait_for()
            proxy.cut()  # the network goes away...
            await page.wait_for_selector("#connection[data-state=reconnecting]")
            await tab.shot("board-reconnecting")
            second = await place_call(client, console_workspace)  # ...while a call starts
            await client.delete(f"/v1/calls/{first}", headers=console_workspace.headers)
            # Back: the resume (Last-Event-ID) brings in what happened, and the page says so.
            await page.locator(f"#live-calls li[data-id={second}]").wait_for()
            await page.locator(f"#ended-calls li[data-id={first}]").wait_for()
            await page.wait_for_selector("#connection[data-state=live]")
            await page.locator("#banner", has_text="missed meanwhile recovered").wait_for()
            await tab.shot("board-resumed")
            await client.delete(f"/v1/calls/{second}", headers=console_workspace.headers)
            await page.locator(f"#ended-calls li[data-id={second}]").wait_for()
    finally:
        await context.close()
    assert not [e for e in tab.errors if "ERR_" not in e], tab.errors


async def test_lists_page_beyond_the_first_twenty_and_errors_say_what_to_do(
    browser: Browser, server: ServerThread, database_url: str, client: httpx.AsyncClient
) -> None:
    workspace = await new_workspace(database_url, "Paging")
    placed = [await place_call(client, workspace) for _ in range(23)]
    context = await browser.new_context()
    page = await context.new_page()
    page.set_default_timeout(WAIT)
    tab = Console(page, server.url)
    try:
        # A key that is refused says why and what to do, and the page keeps nothing of it.
        await page.goto(server.url + "/")
        await page.fill("#api-key", "pk_live_" + "0" * 40)
        await page.click("#sign-in")
        await page.locator("[role=alert]", has_text="refused").wait_for()
        await tab.shot("sign-in-refused")
        await sign_in(page, server.url, workspace.key)
        rows = page.locator("#live-calls > li[data-id]")
        await page.locator("#live-more").wait_for()
        assert await rows.count() == 20
        assert await page.inner_text("#count-live") == "20+"
        await page.click("#live-more")
        await page.locator("#live-more").wait_for(state="hidden")
        assert sorted(await rows.evaluate_all("rows => rows.map(r => r.dataset.id)")) == sorted(
            placed
        )
        assert await page.inner_text("#count-live") == "23"
        # An unknown call: the error, and what to do about it.
        await tab.open("#/calls/call_" + "x" * 22)
        error = page.locator("#view-error")
        await error.filter(has_text="pick it again from the board").wait_for()
        await tab.shot("call-not-found")
    finally:
        await context.close()
    # The refused key's 401 and the unknown call's 404 are all the browser may complain about.
    assert all("401" in e or "404" in e for e in tab.errors), tab.errors


async def test_a_call_played_to_its_end_shows_its_quality_and_who_ended_it(
    console: Console, bus: Client, console_workspace: Workspace
) -> None:
    page = console.page
    await page.wait_for_selector("#connection[data-state=live]")
    playing = Simulator(
        bus,
        SimulationPlan(
            console_workspace.id, calls=1, conversations=0, seed=11, pace=0.1, transports=("sip",)
        ),
    )
    await playing.start()
    try:
        await asyncio.wait_for(playing.wait(), 60)
    finally:
        await playing.stop()
    [call_id] = playing.finished_calls
    row = page.locator(f"#ended-calls li[data-id={call_id}]")
    await row.locator(".mos").wait_for()  # the MOS of its call.quality, pushed
    assert "completed" in await row.inner_text()
    await console.shot("board-mos")
    await row.locator("a").click()
    summary = page.locator("#call-summary")
    await summary.filter(has_text="MOS").wait_for()
    assert "completed" in await summary.inner_text()
    assert await page.locator("#transcript .turn.final").count() >= 2
    await page.wait_for_selector("button[data-digit='5'][disabled]")
    await console.shot("call-summary")


async def test_a_key_press_that_cannot_be_sent_says_so(
    console: Console,
    client: httpx.AsyncClient,
    console_workspace: Workspace,
    simulator: Simulator,
) -> None:
    """The call's socket drops (the test closes it with 1011, as a fault would) and its
    reconnection is held back: a press meanwhile says it was not sent, and why."""
    page = console.page
    call_id = await place_call(client, console_workspace)
    held = asyncio.Event()
    sockets: list[Any] = []

    async def route(socket: Any) -> None:
        sockets.append(socket)
        if len(sockets) > 1:
            await held.wait()
        socket.connect_to_server()

    await page.route_web_socket(f"**/v1/calls/{call_id}/stream*", route)
    await console.open(f"#/calls/{call_id}")
    await page.wait_for_selector("#socket-state[data-state=live]")
    await sockets[0].close(code=1011, reason="test fault")
    await page.wait_for_selector("#socket-state[data-state=reconnecting]")
    await page.click("button[data-digit='3']")
    not_sent = page.locator("#dtmf-results li.error", has_text="3: not sent")
    await not_sent.wait_for()
    assert "connection is down" in await not_sent.inner_text()
    held.set()
    await page.wait_for_selector("#socket-state[data-state=live]")
    await page.click("button[data-digit='3']")
    await page.locator("#dtmf-results li.ok", has_text="3: ok").wait_for()
    await console.shot("call-keypad-not-sent")
    await client.delete(f"/v1/calls/{call_id}", headers=console_workspace.headers)
    await page.wait_for_selector("button[data-digit='3'][disabled]")
