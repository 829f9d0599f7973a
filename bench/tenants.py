"""Noisy neighbour benchmark (issue 13, item 5): one workspace floods requests and streams,
another goes about its business; how much does the second one notice?

Starts `switchboard serve` on the embedded default with the product's per-workspace limits
(1,000 open streams, 20,000 requests a minute), makes a second workspace, and alternates two
phases on the same server, `--rounds` times: *quiet* (only the victim) and *flood* (the victim,
and the flooder opening `--flood-streams` workspace streams and sending `--flood-rps` REST
requests a second on keep-alive connections from its own processes). In both phases the victim
holds `--streams` transcript streams on `--calls` calls with `--rate` events per call per second
and reads one of its calls over REST `--probe-rps` times a second. Reported per phase: the
victim's frame latency (publish to client) and REST latency, p50 / p99, and their ratio flood /
quiet; the flooder's admitted and refused (429) requests and streams; server CPU; load average.

    .venv/bin/python -m bench.tenants --streams 200 --calls 10 --rate 5 --seconds 15 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil

from bench.fanout import (
    Plan,
    machine,
    percentile,
    publish,
    raise_fd_limit,
    start_server,
    stop_server,
    tree_cpu,
    worker,
)

# --- the flooder (its own processes) -----------------------------------------------------------


async def _kept_alive_requests(
    url: str, key: str, rps: float, stop_at: float, counts: dict[str, int]
) -> None:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = f"GET /v1/workspace HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n"
    started = time.monotonic()
    sent = 0
    while time.monotonic() < stop_at:
        writer.write(request.encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        status = int(head.split(b" ", 2)[1])
        outcome = "admitted" if status == 200 else f"status_{status}"
        counts[outcome] = counts.get(outcome, 0) + 1
        sent += 1
        delay = started + sent / rps - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    writer.close()


async def _open_streams(url: str, key: str, count: int, counts: dict[str, int]) -> list[Any]:
    host, port = url.removeprefix("http://").split(":")
    held = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection(host, int(port))
        request = f"GET /v1/events/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}"
        writer.write(f"{request}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 200"):
            counts["streams_open"] += 1
            held.append(writer)
        else:
            counts["streams_refused"] += 1
            writer.close()
    return held


def flooder(
    url: str, key: str, streams: int, rps: float, connections: int, conn: Connection
) -> None:
    import uvloop

    async def main() -> None:
        counts: dict[str, int] = {
            "admitted": 0,
            "status_429": 0,
            "streams_open": 0,
            "streams_refused": 0,
        }
        held = await _open_streams(url, key, streams, counts)
        conn.send(("open", dict(counts)))
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # "go"
        stop_at = time.monotonic() + 3600
        loop = asyncio.get_running_loop()
        hammering = [
            asyncio.create_task(_kept_alive_requests(url, key, rps / connections, stop_at, counts))
            for _ in range(connections)
        ]
        await loop.run_in_executor(None, conn.recv)  # "stop"
        for task in hammering:
            task.cancel()
        for writer in held:
            writer.close()
        conn.send(("done", dict(counts)))

    uvloop.run(main())


# --- the driver -------------------------------------------------------------------------------


def second_workspace(data_dir: Path) -> str:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "switchboard", "workspace", "create", "victim", "--json"),
            *("--data-dir", str(data_dir)),
        ],
        capture_output=True,
        check=True,
        text=True,
        timeout=60,
    )
    return str(orjson.loads(done.stdout)["api_key"])


async def probe(url: str, key: str, path: str, rps: float, stop: asyncio.Event) -> list[float]:
    """The victim's REST reads: latency of each, paced at `rps`."""
    latencies: list[float] = []
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as http:
        while not stop.is_set():
            began = time.perf_counter()
            response = await http.get(path)
            latencies.append(time.perf_counter() - began)
            response.raise_for_status()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, 1 / rps - latencies[-1]))
    return latencies


def phase(
    args: argparse.Namespace,
    name: str,
    url: str,
    flood_key: str,
    victim_key: str,
    victim_ws: str,
    calls: list[str],
    server: psutil.Process,
    nats_url: str,
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    streams = [("sse", calls[n % len(calls)]) for n in range(args.streams)]
    parent, child = ctx.Pipe()
    victim = ctx.Process(target=worker, args=(Plan(url, victim_key, streams), child))
    victim.start()
    if not parent.poll(120):
        raise RuntimeError("the victim's streams did not open")
    parent.recv()
    floods: list[tuple[Any, Connection]] = []
    flood_open: dict[str, int] = {}
    if name == "flood":
        for index in range(args.flood_processes):
            mine, theirs = ctx.Pipe()
            share = args.flood_streams // args.flood_processes
            if index == 0:
                share += args.flood_streams % args.flood_processes
            rps = args.flood_rps / args.flood_processes
            process = ctx.Process(
                target=flooder,
                args=(url, flood_key, share, rps, args.flood_connections, theirs),
            )
            process.start()
            floods.append((process, mine))
        for _process, mine in floods:
            if not mine.poll(300):
                raise RuntimeError("the flooder did not open its streams")
            for k, v in mine.recv()[1].items():
                flood_open[k] = flood_open.get(k, 0) + v
        for _process, mine in floods:
            mine.send("go")
    cpu_before = tree_cpu(server)

    async def run() -> tuple[int, list[float]]:
        stop = asyncio.Event()
        probing = asyncio.create_task(
            probe(url, victim_key, f"/v1/calls/{calls[0]}", args.probe_rps, stop)
        )
        sent, _ = await publish(nats_url, victim_ws, calls, args.rate, args.seconds, {"sse"})
        stop.set()
        return sent, await probing

    sent, rest = asyncio.run(run())
    time.sleep(1.0)  # the last frames in flight
    cpu = tree_cpu(server) - cpu_before
    parent.send("stop")
    _tag, frames, latencies, _busy = parent.recv()
    victim.join(30)
    flood_counts: dict[str, int] = {}
    for process, mine in floods:
        mine.send("stop")
        for k, v in mine.recv()[1].items():
            flood_counts[k] = flood_counts.get(k, 0) + v
        process.join(30)
    expected = sent * (args.streams // len(calls))
    return {
        "phase": name,
        "victim_frames": f"{frames}/{expected}",
        "victim_stream_ms_p50": round(percentile(latencies, 0.5) * 1000, 2),
        "victim_stream_ms_p99": round(percentile(latencies, 0.99) * 1000, 2),
        "victim_rest_ms_p50": round(percentile(rest, 0.5) * 1000, 2),
        "victim_rest_ms_p99": round(percentile(rest, 0.99) * 1000, 2),
        "flooder_streams_open": flood_open.get("streams_open", 0),
        "flooder_streams_refused": flood_open.get("streams_refused", 0),
        "flooder_requests_admitted": flood_counts.get("admitted", 0),
        "flooder_requests_refused": flood_counts.get("status_429", 0),
        "server_cpu_seconds": round(cpu, 2),
        "load1": os.getloadavg()[0],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="switchboard-tenants-") as scratch:
        data_dir = Path(scratch)
        # The product's limits, not lifted: they are what this benchmark measures.
        process, url, flood_key = start_server(data_dir, lift_limits=False)
        try:
            server = psutil.Process(process.pid)
            victim_key = second_workspace(data_dir)
            nats_url = orjson.loads((data_dir / "run.json").read_bytes())["nats_url"]
            http = httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {victim_key}"}, timeout=30
            )
            victim_ws = http.get("/v1/workspace").json()["id"]
            body = {"to_number": "+14155550100", "from_number": "+14155550101"}
            calls = [http.post("/v1/calls", json=body).json()["id"] for _ in range(args.calls)]
            http.close()
            phases = []
            load_start = os.getloadavg()
            for _ in range(args.rounds):
                for name in ("quiet", "flood"):
                    phases.append(
                        phase(
                            args,
                            name,
                            url,
                            flood_key,
                            victim_key,
                            victim_ws,
                            calls,
                            server,
                            nats_url,
                        )
                    )
        finally:
            stop_server(process)
    quiet = [p for p in phases if p["phase"] == "quiet"]
    flood = [p for p in phases if p["phase"] == "flood"]

    def ratio(key: str) -> float:
        calm = sorted(p[key] for p in quiet)[len(quiet) // 2]
        loud = sorted(p[key] for p in flood)[len(flood) // 2]
        return round(loud / calm, 2) if calm else float("inf")

    return {
        "phases": phases,
        "ratio_flood_over_quiet": {
            key: ratio(key)
            for key in (
                "victim_stream_ms_p50",
                "victim_stream_ms_p99",
                "victim_rest_ms_p50",
                "victim_rest_ms_p99",
            )
        },
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "machine": machine(),
        "args": vars(args),
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--streams", type=int, default=200, help="the victim's transcript streams")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--rate", type=float, default=5.0, help="events per call per second")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--probe-rps", type=float, default=20.0, help="the victim's REST reads/s")
    p.add_argument("--flood-streams", type=int, default=1200)
    p.add_argument("--flood-rps", type=float, default=2000.0)
    p.add_argument("--flood-processes", type=int, default=2)
    p.add_argument("--flood-connections", type=int, default=8, help="per flood process")
    p.add_argument("--rounds", type=int, default=2)
    return p


def main() -> None:
    result = run(parser().parse_args())
    for row in result["phases"]:
        print(" ".join(f"{k}={v}" for k, v in row.items()))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
