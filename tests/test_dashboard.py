"""The dashboard in real headless Chromium (Debian's, driven by Playwright), with the
simulator playing a call: a partial then its final appear, a DTMF press shows ok, a handoff
click shows the mode change. Screenshots go to test-artifacts/."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from nats.aio.client import Client
from playwright.async_api import Page

from switchboard.simulate import SimulationPlan, Simulator
from tests.harness import ServerThread, Workspace, eventually

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

HAVE_BROWSER = Path(CHROMIUM).exists()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not HAVE_BROWSER and not os.environ.get("SWITCHBOARD_REQUIRE_BROWSER"),
        reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)",
    ),
]


@pytest.fixture
async def page(server: ServerThread, workspace: Workspace) -> AsyncIterator[Page]:
    from playwright.async_api import async_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        tab = await browser.new_page()
        await tab.goto(server.url + "/")
        await tab.fill("#api-key", workspace.key)
        await tab.click("#sign-in")
        await tab.wait_for_selector("#calls", state="attached")
        yield tab
        await browser.close()


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
