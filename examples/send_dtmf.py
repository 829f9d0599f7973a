"""Send DTMF digits into a live call and print its events until it ends.

SWITCHBOARD_API_KEY=pk_live_... python examples/send_dtmf.py call_... 12#
"""

import asyncio
import os
import sys

from switchboard.client import SwitchboardClient


async def main(call_id: str, digits: str) -> None:
    url = os.environ.get("SWITCHBOARD_URL", "http://127.0.0.1:8080")
    async with (
        SwitchboardClient(url, os.environ["SWITCHBOARD_API_KEY"]) as sb,
        sb.call_events(call_id) as call,
    ):

        async def events() -> None:
            async for event in call:
                print(event["timestamp"], event["event_type"], event["payload"])

        printer = asyncio.create_task(events())
        result = await call.send_dtmf(digits)
        print("command.result:", result)
        await printer


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
