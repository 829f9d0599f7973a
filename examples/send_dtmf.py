"""Send DTMF digits into a live call and print its events until it ends.

usage: SWITCHBOARD_API_KEY=pk_live_... .venv/bin/python examples/send_dtmf.py CALL_ID DIGITS
       (CALL_ID: a live call_...; DIGITS: 1 to 32 of 0-9*#A-D; SWITCHBOARD_URL, default
       http://127.0.0.1:8080, names the server)
"""

import asyncio

from switchboard.client import SwitchboardClient, script_arguments


async def main(call_id: str, digits: str) -> None:
    async with (
        SwitchboardClient.from_environment() as sb,
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
    call_id, digits = script_arguments(__doc__ or "", 2)
    asyncio.run(main(call_id, digits))
