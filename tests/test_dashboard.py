"""The dashboard in real headless Chromium (Debian's, driven by Playwright), with the
simulator playing a call: a partial then its final appear, a DTMF press shows ok, a handoff
click shows the mode change, Listen plays the call's audio. Screenshots go to test-artifacts/."""

from __future__ import annotations

import asyncio
import contextlib
import math
from array import array
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from nats.aio.client import Client
from playwright.async_api import Browser, Page, Request, WebSocket

from switchboard.producer import Producer
from switchboard.simulate import SimulationPlan, Simulator
from switchboard.simulate.runner import CallAudio
from tests.browser import ARTIFACTS, BROWSER_TESTS
from tests.harness import ServerThread, Workspace, eventually
from tests.test_streams import new_call

pytestmark = BROWSER_TESTS


@pytest.fixture
async def page(browser: Browser, server: ServerThread, workspace: Workspace) -> AsyncIterator[Page]:
    context = await browser.new_context()
    tab = await context.new_page()
    await tab.goto(server.url + "/")
    await tab.fill("#api-key", workspace.key)
    await tab.click("#sign-in")
    await tab.wait_for_selector("#live-calls", state="attached")
    yield tab
    await context.close()


async def test_live_call_transcript_and_dtmf_in_the_browser(
    page: Page, server: ServerThread, workspace: Workspace, bus: Client, client: httpx.AsyncClient
) -> None:
    tab = page
    simulator = Simulator(
        bus, SimulationPlan(workspace.id, calls=0, conversations=0, seed=2, pace=1.0)
    )
    await simulator.start()
    try:
        placed = await client.post(
            "/v1/calls",
            headers=workspace.headers,
            json={"to_number": "+14155550191", "from_number": "+14155550000", "transport": "sip"},
        )
        call_id = placed.json()["id"]
        await eventually(lambda: call_id in simulator.live_calls)
        await tab.goto(f"{server.url}/#/calls/{call_id}")
        partial = await tab.wait_for_selector(".turn.partial", timeout=15000)
        turn_id = await partial.get_attribute("id")
        await tab.screenshot(path=str(ARTIFACTS / "call-partial.png"))
        await tab.wait_for_selector(f"#{turn_id}.final", timeout=15000)
        await tab.wait_for_selector("#socket-state[data-state=live]")
        await tab.click("button[data-digit='5']")
        await tab.wait_for_selector("#dtmf-results li.ok", timeout=10000)
        assert "5: ok" in await tab.inner_text("#dtmf-results")
        await tab.wait_for_selector("#timeline li.call-dtmf_sent", timeout=10000)
        await tab.screenshot(path=str(ARTIFACTS / "call-dtmf.png"))
        # Hang up: the transcript shows the end.
        await client.delete(f"/v1/calls/{call_id}", headers=workspace.headers)
        await tab.wait_for_selector("#transcript-state[data-state=ended]", timeout=10000)
        assert workspace.key not in await tab.content()
    finally:
        await simulator.stop()


async def test_a_call_opened_mid_way_or_after_its_end_shows_its_whole_transcript(
    page: Page, server: ServerThread, workspace: Workspace, bus: Client, client: httpx.AsyncClient
) -> None:
    tab = page
    producer = Producer(bus)
    call_id = await new_call(client, workspace)

    async def say(text: str) -> None:
        turn_id = producer.new_turn_id()
        for final in (False, True):
            await producer.turn(
                workspace.id, call_id, role="user", text=text, is_final=final, turn_id=turn_id
            )

    await say("Said before the view opened")
    await say("And this too")
    async with tab.expect_request(lambda request: "/transcript/stream" in request.url) as opening:
        await tab.goto(f"{server.url}/#/calls/{call_id}")
    query = parse_qs(urlsplit((await opening.value).url).query)
    assert query["from"] == ["start"] and query["token"][0].startswith("st_")
    turns = tab.locator("#transcript .turn.final")
    await turns.filter(has_text="And this too").wait_for(timeout=10000)
    await tab.wait_for_selector("#transcript-state[data-state=live]")
    await say("Said live")
    await turns.filter(has_text="Said live").wait_for(timeout=10000)
    await client.delete(f"/v1/calls/{call_id}", headers=workspace.headers)
    await tab.wait_for_selector("#transcript-state[data-state=ended]", timeout=10000)
    # A view opened after the end: every turn, in order, then the end.
    await tab.reload()
    await tab.wait_for_selector("#transcript-state[data-state=ended]", timeout=10000)
    shown = await tab.locator("#transcript .turn.final .text").all_inner_texts()
    assert shown == [
        "Said before the view opened",
        "And this too",
        "Said live",
    ]
    await tab.screenshot(path=str(ARTIFACTS / "call-from-start.png"))


async def test_conversation_handoff_in_the_browser(
    page: Page, server: ServerThread, workspace: Workspace, client: httpx.AsyncClient
) -> None:
    tab = page
    sent = await client.post(
        "/v1/messages",
        headers=workspace.headers,
        json={
            "channel": "sms",
            "to_number": "+14155550192",
            "from_number": "+14155550000",
            "text": "Hello from the API",
        },
    )
    conversation_id = sent.json()["conversation_id"]
    await tab.goto(f"{server.url}/#/conversations/{conversation_id}")
    await tab.wait_for_selector("#conversation-state[data-state=live]", timeout=10000)
    assert "Hello from the API" in await tab.inner_text("#messages")
    await tab.click("#mode-human")
    # Locators, not wait_for_function: the page's CSP (rightly) forbids eval.
    await tab.locator("#mode", has_text="human").wait_for(timeout=10000)
    # A message sent elsewhere appears live.
    await client.post(
        "/v1/messages",
        headers=workspace.headers,
        json={"conversation_id": conversation_id, "text": "second"},
    )
    await tab.locator("#messages li", has_text="second").wait_for(timeout=10000)
    await tab.screenshot(path=str(ARTIFACTS / "conversation-handoff.png"))


class CuttableProxy:
    """A TCP proxy in front of the server whose open connections the test cuts at once, as a
    lost network would; new connections go through."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.url = ""
        self._open: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> CuttableProxy:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()

    def cut(self) -> None:
        for writer in self._open:
            writer.transport.abort()
        self._open.clear()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._open += [writer, up_writer]

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))


async def sign_in(tab: Page, url: str, key: str) -> None:
    await tab.goto(url + "/")
    await tab.fill("#api-key", key)
    await tab.click("#sign-in")
    await tab.wait_for_selector("#live-calls", state="attached")


async def test_a_call_view_that_lost_its_connections_resumes_where_it_was(
    page: Page, server: ServerThread, workspace: Workspace, bus: Client, client: httpx.AsyncClient
) -> None:
    tab = page
    producer = Producer(bus)
    call_id = await new_call(client, workspace)

    async def say(text: str) -> None:
        turn_id = producer.new_turn_id()
        await producer.turn(
            workspace.id, call_id, role="user", text=text, is_final=True, turn_id=turn_id
        )

    async with CuttableProxy(server.url) as proxy:
        await sign_in(tab, proxy.url, workspace.key)
        streams: list[Request] = []
        sockets: list[str] = []
        tab.on("request", lambda r: streams.append(r) if "/transcript/stream" in r.url else None)
        tab.on("websocket", lambda socket: sockets.append(socket.url))
        await tab.goto(f"{proxy.url}/#/calls/{call_id}")
        await tab.wait_for_selector("#socket-state[data-state=live]", timeout=10000)
        await tab.wait_for_selector("#transcript-state[data-state=live]", timeout=10000)
        await say("before the cut")
        turns = tab.locator("#transcript .turn.final")
        await turns.filter(has_text="before the cut").wait_for(timeout=10000)
        await tab.locator("#timeline li").first.wait_for(timeout=10000)
        proxy.cut()
        await say("during the cut")  # EventSource waits out the server's retry: hint first
        await turns.filter(has_text="during the cut").wait_for(timeout=15000)
        # EventSource itself reconnected, with Last-Event-ID (same URL: from=start is there too,
        # and the cursor wins); the socket resumed after the last event it showed.
        assert len(streams) == 2 and streams[0].url == streams[1].url
        headers = await streams[1].all_headers()
        assert headers["last-event-id"].startswith("t")
        await eventually(lambda: len(sockets) == 2)
        assert parse_qs(urlsplit(sockets[1]).query)["last_event_id"][0].startswith("evt_")
        assert await turns.count() == 2
        assert await tab.locator("#timeline li").count() == len(
            set(await tab.locator("#timeline li").all_inner_texts())
        )


async def test_a_conversation_view_that_lost_its_connection_resumes_from_the_last_id(
    page: Page, server: ServerThread, workspace: Workspace, client: httpx.AsyncClient
) -> None:
    tab = page
    sent = await client.post(
        "/v1/messages",
        headers=workspace.headers,
        json={
            "channel": "sms",
            "to_number": "+14155550193",
            "from_number": "+14155550000",
            "text": "first",
        },
    )
    conversation_id = sent.json()["conversation_id"]
    async with CuttableProxy(server.url) as proxy:
        await sign_in(tab, proxy.url, workspace.key)
        streams: list[Request] = []
        tab.on("request", lambda r: streams.append(r) if r.url.endswith("/stream") else None)
        await tab.goto(f"{proxy.url}/#/conversations/{conversation_id}")
        await tab.wait_for_selector("#conversation-state[data-state=live]", timeout=10000)
        message = {"conversation_id": conversation_id, "text": "second"}
        await client.post("/v1/messages", headers=workspace.headers, json=message)
        await tab.locator("#messages li", has_text="second").wait_for(timeout=10000)
        proxy.cut()
        message = {"conversation_id": conversation_id, "text": "said during the cut"}
        await client.post("/v1/messages", headers=workspace.headers, json=message)
        await tab.locator("#messages li", has_text="said during the cut").wait_for(timeout=15000)
        assert len(streams) == 2
        assert (await streams[1].all_headers())["last-event-id"].startswith("e")


async def test_listen_plays_the_calls_audio_through_web_audio(
    page: Page, server: ServerThread, workspace: Workspace, bus: Client, client: httpx.AsyncClient
) -> None:
    """A producer plays a 440 Hz tone into a live call; Listen (pressed from the keyboard) asks
    the socket for it and the page schedules it on its AudioContext, whose analyser hears it."""
    tab = page
    producer = Producer(bus)
    call_id = await new_call(client, workspace)
    tone = array("h", (round(8000 * math.sin(2 * math.pi * 440 * n / 16000)) for n in range(16000)))
    sent: list[str] = []

    def on_socket(socket: WebSocket) -> None:
        socket.on("framesent", lambda payload: sent.append(str(payload)))

    tab.on("websocket", on_socket)

    async def publish(chunk: bytes) -> None:
        await producer.audio(workspace.id, call_id, chunk)

    audio = CallAudio(call_id, publish)  # 20 ms chunks in real time, silence when no tone
    audio.start()
    try:
        await tab.goto(f"{server.url}/#/calls/{call_id}")
        await tab.wait_for_selector("#socket-state[data-state=live]", timeout=10000)
        listen = tab.locator("#listen")
        await listen.and_(tab.locator(":enabled")).wait_for(timeout=10000)
        assert await tab.locator("#level").get_attribute("data-chunks") == "0"
        audio.mixer.add("tone", tone * 120)  # two minutes of it: longer than the test
        await listen.focus()
        await tab.keyboard.press("Enter")
        await tab.wait_for_selector("#listen[aria-pressed=true]")
        await tab.wait_for_selector("#listen-state[data-state=live]", timeout=10000)
        assert any('"action": "listen"' in frame or '"action":"listen"' in frame for frame in sent)

        async def heard(chunks: int) -> bool:
            level = tab.locator("#level")
            played = int(await level.get_attribute("data-chunks") or 0)
            rms = float(await level.get_attribute("data-rms") or 0)
            # 8000 / 32768 peak: an RMS of 0.17 when the tone is playing.
            return played >= chunks and abs(rms - 8000 / 32768 / math.sqrt(2)) < 0.03

        await eventually(lambda: heard(25), within=10.0)
        await tab.screenshot(path=str(ARTIFACTS / "call-listen.png"))
        # Muted: nothing reaches the speakers, but the meter still shows the call talking.
        await tab.click("#mute")
        await tab.wait_for_selector("#mute[aria-pressed=true]")
        played = int(await tab.locator("#level").get_attribute("data-chunks") or 0)
        await eventually(lambda: heard(played + 25), within=10.0)
        # Pressed again: unlisten, and the level falls.
        await listen.click()
        await tab.wait_for_selector("#listen[aria-pressed=false]")
        await tab.wait_for_selector("#listen-state[data-state=off]")
        assert any("unlisten" in frame for frame in sent)
        assert await tab.locator("#level").get_attribute("data-rms") == "0"
        # Listening when the call ends: it stops, and Listen cannot be pressed any more.
        await listen.click()
        await tab.wait_for_selector("#listen-state[data-state=live]", timeout=10000)
        await client.delete(f"/v1/calls/{call_id}", headers=workspace.headers)
        await tab.wait_for_selector("#listen-state[data-state=ended]", timeout=10000)
        await tab.wait_for_selector("#listen[disabled]")
        await tab.wait_for_selector("#listen[aria-pressed=false]")
    finally:
        await audio.stop()
