"""Print a call's live transcript until the call ends.

SWITCHBOARD_API_KEY=pk_live_... python examples/watch_transcript.py call_...
"""

import asyncio
import os
import sys

from switchboard.client import SwitchboardClient


async def main(call_id: str) -> None:
    url = os.environ.get("SWITCHBOARD_URL", "http://127.0.0.1:8080")
    async with SwitchboardClient(url, os.environ["SWITCHBOARD_API_KEY"]) as sb:
        async for turn in sb.transcript(call_id):
            if turn["is_final"]:
                print(f"{turn['role']}: {turn['text']}")
    print("call ended")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
