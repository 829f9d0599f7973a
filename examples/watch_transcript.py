"""Print a call's transcript, from its first turn, until the call ends. A dropped connection or a
restarting server costs nothing: the client resumes from the last turn it printed, on the next
of the URLs if one is down.

usage: SWITCHBOARD_API_KEY=pk_live_... .venv/bin/python examples/watch_transcript.py CALL_ID
       (SWITCHBOARD_URL names the server, default http://127.0.0.1:8080; several replicas
       comma-separated: SWITCHBOARD_URL=http://a:8080,http://b:8080)
"""

import asyncio

from switchboard.client import SwitchboardClient, script_arguments


async def main(call_id: str) -> None:
    async with SwitchboardClient.from_environment() as sb:
        turns = sb.transcript(call_id, from_start=True, on_reset=lambda reason: print("!", reason))
        async for turn in turns:
            if turn["is_final"]:
                print(f"{turn['role']}: {turn['text']}")
    print("call ended")


if __name__ == "__main__":
    (call_id,) = script_arguments(__doc__ or "", 1)
    asyncio.run(main(call_id))
