"""Print every completed call and every message of a workspace as it happens, forever. The
cursor of the last event is saved to a file, so a restarted script carries on where it stopped
(within the server's history window) instead of missing what happened in between.

usage: SWITCHBOARD_API_KEY=pk_live_... .venv/bin/python examples/watch_workspace.py CURSOR_FILE
       (CURSOR_FILE: where the cursor is kept, e.g. cursor.txt; SWITCHBOARD_URL names the
       server, default http://127.0.0.1:8080)
"""

import asyncio
from pathlib import Path

from switchboard.client import SwitchboardClient, script_arguments


async def main(cursor_file: Path, kept: str | None) -> None:
    async with SwitchboardClient.from_environment() as sb:
        events = sb.events(
            ["call.completed", "message.*"],
            last_event_id=kept or None,
            on_reset=lambda reason: print(f"could not resume ({reason}): some events missed"),
        )
        async for event in events:
            where = event.get("call_id") or event.get("conversation_id")
            print(event["timestamp"], where, event["event_type"], event["payload"])
            if events.cursor is not None:
                await asyncio.to_thread(cursor_file.write_text, events.cursor)


if __name__ == "__main__":
    path = Path(script_arguments(__doc__ or "", 1)[0])
    asyncio.run(main(path, path.read_text().strip() if path.exists() else None))
