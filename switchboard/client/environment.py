"""Where a client script finds its server and key: `SWITCHBOARD_URL` (one base URL or several,
comma- or space-separated, as `--url` takes them) and `SWITCHBOARD_API_KEY`; and the argument
check the examples share (usage and exit status 2 rather than a traceback)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

DEFAULT_URL = "http://127.0.0.1:8080"


def server_urls(*values: str) -> list[str]:
    """Base URLs from values that may each hold several, comma- or space-separated; the default
    server when there are none."""
    urls = [url for value in values for url in value.replace(",", " ").split()]
    return urls or [DEFAULT_URL]


def script_arguments(usage: str, count: int, env: Mapping[str, str] | None = None) -> list[str]:
    """A script's `count` arguments; without them, or without `SWITCHBOARD_API_KEY`, prints
    `usage` and what is missing, and exits with status 2."""
    environ = os.environ if env is None else env
    problem = None
    if len(sys.argv) != count + 1 or sys.argv[1] in ("-h", "--help"):
        problem = f"expected {count} argument{'s' if count > 1 else ''}"
    elif not environ.get("SWITCHBOARD_API_KEY"):
        problem = "SWITCHBOARD_API_KEY is not set"
    if problem is not None:
        print(f"{usage}\n{problem}", file=sys.stderr)
        sys.exit(2)
    return sys.argv[1:]
