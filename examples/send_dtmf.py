"""Send DTMF digits into a live call and print its events until it ends.

usage: SWITCHBOARD_API_KEY=pk_live_... .venv/bin/python examples/send_dtmf.py CALL_ID DIGITS
       (CALL_ID: a live call_...; DIGITS: 1 to 32 of 0-9*#A-D; SWITCHBOARD_URL, default
       http://127.0.0.1:8080, names the server)
"""

import asyncio
import os
import sys

from switchboard.client import SwitchboardClient


async def main(call_id: str, digits: str) -> None:
    urls = os.environ.get("SWITCHBOARD_URL", "http://127.0.0.1:8080").split(",")
    async with (
        SwitchboardClient(urls, os.environ["SWITCHBOARD_API_KEY"]) as sb,
        sb.call_events(call_id) as call,
    ):

        async def events() -> None:
            async for event in call:
                print(event["timestamp"], event["event_type"], event["payload"])

        printer = asyncio.create_task(events())
        result = await call.send_dtmf(digits)
        print("command.result:", result)
        await printer


def arguments(count: int) -> list[str]:
    """The script's arguments; without them, or without a key, its usage and exit status 2."""
    problem = None
    if len(sys.argv) != count + 1 or sys.argv[1] in ("-h", "--help"):
        problem = f"expected {count} argument{'s' if count > 1 else ''}"
    elif not os.environ.get("SWITCHBOARD_API_KEY"):
        problem = "SWITCHBOARD_API_KEY is not set"
    if problem is not None:
        print(f"{__doc__}\n{problem}", file=sys.stderr)
        sys.exit(2)
    return sys.argv[1:]


if __name__ == "__main__":
    call_id, digits = arguments(2)
    asyncio.run(main(call_id, digits))
