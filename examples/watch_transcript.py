"""Print a call's transcript, from its first turn, until the call ends. A dropped connection or a
restarting server costs nothing: the client resumes from the last turn it printed, on the next
of the URLs if one is down.

usage: SWITCHBOARD_API_KEY=pk_live_... .venv/bin/python examples/watch_transcript.py CALL_ID
       (SWITCHBOARD_URL names the server, default http://127.0.0.1:8080; several replicas
       comma-separated: SWITCHBOARD_URL=http://a:8080,http://b:8080)
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
    (call_id,) = arguments(1)
    asyncio.run(main(call_id))
