"""Print a call's transcript, from its first turn, until the call ends. A dropped connection or a
restarting server costs nothing: the client resumes from the last turn it printed, on the next
of the URLs if one is down.

SWITCHBOARD_URL=http://a:8080,http://b:8080 SWITCHBOARD_API_KEY=pk_live_... \
    python examples/watch_transcript.py call_...
"""

import asyncio
import os
import sys

from switchboard.client import SwitchboardClient


async def main(call_id: str) -> None:
    urls = os.environ.get("SWITCHBOARD_URL", "http://127.0.0.1:8080").split(",")
    async with SwitchboardClient(urls, os.environ["SWITCHBOARD_API_KEY"]) as sb:
        turns = sb.transcript(call_id, from_start=True, on_reset=lambda reason: print("!", reason))
        async for turn in turns:
            if turn["is_final"]:
                print(f"{turn['role']}: {turn['text']}")
    print("call ended")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
