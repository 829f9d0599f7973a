"""What the browser tests share: Debian's Chromium (a test tool's own browser download cannot
work here), where screenshots go, and the marks that skip them without it (CI requires it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
HAVE_BROWSER = Path(CHROMIUM).exists()
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

BROWSER_TESTS = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not HAVE_BROWSER and not os.environ.get("SWITCHBOARD_REQUIRE_BROWSER"),
        reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)",
    ),
]
