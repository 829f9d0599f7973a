"""Write-to-stream latency: what the transactional outbox costs between a REST write and its
event on a live stream.

Starts `switchboard serve` on the embedded default, opens a conversation SSE stream, and sends
messages into that conversation one at a time (`POST /v1/messages`), at rest (a pause between
writes). For each write it reports, on one clock:

- `response`: request sent to 2xx received (the write's own latency);
- `frame`: request sent to the `message.sent` frame read from the stream;
- `after_response`: 2xx received to frame read: the delay the outbox adds for a client that
  waits for the response (the event is published by the relay after the commit, woken by
  LISTEN/NOTIFY). Negative when the frame wins the race with the response.

    .venv/bin/python -m bench.write_latency --writes 500 --pause-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.fanout import machine, percentile, start_server


async def _measure(url: str, key: str, writes: int, pause: float) -> dict[str, list[float]]:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        first = await client.post(
            "/v1/messages",
            json={
                "channel": "sms",
                "to_number": "+14155550102",
                "from_number": "+14155550103",
                "text": "warm-up",
            },
        )
        first.raise_for_status()
        conversation = first.json()["conversation_id"]
        arrived: dict[str, float] = {}
        got: dict[str, asyncio.Event] = {}
        opened = asyncio.Event()

        async def read_stream() -> None:
            async with client.stream(
                "GET", f"/v1/conversations/{conversation}/stream", timeout=None
            ) as stream:
                opened.set()
                async for line in stream.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    envelope = orjson.loads(line[5:])
                    text = envelope.get("payload", {}).get("text", "")
                    if text in got:
                        arrived[text] = time.perf_counter()
                        got[text].set()

        reader = asyncio.create_task(read_stream())
        await asyncio.wait_for(opened.wait(), 10)
        samples: dict[str, list[float]] = {"response": [], "frame": [], "after_response": []}
        try:
            for n in range(writes):
                text = f"write {n}"
                got[text] = asyncio.Event()
                sent = time.perf_counter()
                response = await client.post(
                    "/v1/messages", json={"conversation_id": conversation, "text": text}
                )
                answered = time.perf_counter()
                response.raise_for_status()
                await asyncio.wait_for(got[text].wait(), 10)
                samples["response"].append((answered - sent) * 1000)
                samples["frame"].append((arrived[text] - sent) * 1000)
                samples["after_response"].append((arrived[text] - answered) * 1000)
                await asyncio.sleep(pause)
        finally:
            reader.cancel()
        return samples


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sb-bench-") as scratch:
        process, url, key = start_server(Path(scratch))
        try:
            samples = asyncio.run(_measure(url, key, args.writes, args.pause_ms / 1000))
        finally:
            process.terminate()
            process.wait(30)
    result: dict[str, Any] = {
        "writes": args.writes,
        "pause_ms": args.pause_ms,
        "machine": machine(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    for name, values in samples.items():
        for q in (50, 95, 99):
            result[f"{name}_ms_p{q}"] = round(percentile(values, q / 100), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=500)
    parser.add_argument("--pause-ms", type=float, default=20.0)
    print(orjson.dumps(run(parser.parse_args()), option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
