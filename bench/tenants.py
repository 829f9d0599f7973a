"""Noisy neighbour benchmark (issue 13, item 5): one workspace floods requests and streams,
another goes about its business; how much does the second one notice?

Starts `switchboard serve` on the embedded default with the product's per-workspace limits
(1,000 open streams, 20,000 requests a minute, a burst allowance of
`SWITCHBOARD_WORKSPACE_BURST_SECONDS` of that rate), makes a second workspace, and alternates two
phases on the same server, `--rounds` times: *quiet* (only the victim) and *flood* (the victim,
and the flooder opening `--flood-streams` workspace streams, then sending REST requests on
keep-alive connections from its own processes). The flood's pace cycles through `--flood-paces`
round by round: `allowed` spends as fast as the limits allow without being refused (its whole
burst allowance at once, then the minute's average rate, read from `X-RateLimit-Remaining`),
`fixed` sends `--flood-rps` a second whatever the answers (the allowed pace, and refusals for
the rest). The flooder opens its streams as fast as it is allowed too, and the flood starts once
its burst allowance has refilled, so each flood begins with a full burst. In both phases the
victim holds `--streams` transcript streams on `--calls` calls with `--rate` events per call per
second and reads one of its calls over REST `--probe-rps` times a second. Reported per phase:
the victim's frame latency (publish to client) and REST latency, p50 / p99, and their ratio
flood / quiet (per pace, and the worst); the flooder's admitted and refused (429) requests and
streams; server CPU; load average.

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
from dataclasses import dataclass
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
from switchboard.config import Settings

# --- the flooder (its own processes) -----------------------------------------------------------


@dataclass(frozen=True)
class Flood:
    url: str
    key: str
    streams: int
    pace: str  # "allowed" or "fixed"
    rps: float  # this process's requests a second, for "fixed"
    connections: int  # this process's
    all_connections: int  # every flood process's: each takes its share of the allowed pace
    allowed_rps: float  # the minute's average rate: the pace once the burst is spent
    rate_limit: int  # X-RateLimit-Limit of a request refusal (a stream refusal names another)


async def _answer(
    reader: asyncio.StreamReader, *, body: bool = True
) -> tuple[int, dict[bytes, bytes]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if body:
        await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return int(lines[0].split(b" ", 2)[1]), headers


async def _kept_alive_requests(flood: Flood, stop_at: float, counts: dict[str, int]) -> None:
    host, port = flood.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = f"GET /v1/workspace HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {flood.key}\r\n\r\n"
    # "allowed": this connection's share of the average pace, once the burst is spent.
    share = flood.all_connections / flood.allowed_rps
    pace = flood.connections / flood.rps if flood.pace == "fixed" else share
    next_at = time.monotonic()
    while time.monotonic() < stop_at:
        writer.write(request.encode())
        status, headers = await _answer(reader)
        outcome = "admitted" if status == 200 else f"status_{status}"
        counts[outcome] = counts.get(outcome, 0) + 1
        next_at += pace
        if flood.pace == "allowed":
            if status == 429:  # a race with the other connections: as the server asks
                next_at = time.monotonic() + int(headers[b"retry-after"])
            elif int(headers[b"x-ratelimit-remaining"]) >= flood.all_connections:
                next_at = time.monotonic()  # room for every connection's next one: at once
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    writer.close()


async def _open_streams(flood: Flood, counts: dict[str, int]) -> list[Any]:
    """Opens the streams as fast as it is allowed: a request refusal is waited out and the
    stream asked for again; a refusal by the stream limit is final."""
    host, port = flood.url.removeprefix("http://").split(":")
    held = []
    request = f"GET /v1/events/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {flood.key}"
    opened = 0
    while opened < flood.streams:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"{request}\r\n\r\n".encode())
        status, headers = await _answer(reader, body=False)
        if status == 200:
            counts["streams_open"] += 1
            held.append(writer)
        else:
            writer.close()
            if headers.get(b"x-ratelimit-limit") == str(flood.rate_limit).encode():
                counts["streams_paced"] += 1
                await asyncio.sleep(int(headers[b"retry-after"]))
                continue
            counts["streams_refused"] += 1
        opened += 1
    return held


def flooder(flood: Flood, conn: Connection) -> None:
    import uvloop

    async def main() -> None:
        counts: dict[str, int] = {
            "admitted": 0,
            "status_429": 0,
            "streams_open": 0,
            "streams_refused": 0,
            "streams_paced": 0,
        }
        held = await _open_streams(flood, counts)
        conn.send(("open", dict(counts)))
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # "go"
        began = time.monotonic()
        loop = asyncio.get_running_loop()
        hammering = [
            asyncio.create_task(_kept_alive_requests(flood, began + 3600, counts))
            for _ in range(flood.connections)
        ]
        await loop.run_in_executor(None, conn.recv)  # "stop"
        counts["flood_ms"] = round((time.monotonic() - began) * 1000)
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
    pace: str | None,
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
    limits = Settings()  # the server's: start_server passes it no SWITCHBOARD_* setting
    allowed_rps = limits.workspace_rate_per_minute / 60
    if pace:
        for index in range(args.flood_processes):
            mine, theirs = ctx.Pipe()
            share = args.flood_streams // args.flood_processes
            if index == 0:
                share += args.flood_streams % args.flood_processes
            flood = Flood(
                url,
                flood_key,
                share,
                pace,
                args.flood_rps / args.flood_processes,
                args.flood_connections,
                args.flood_connections * args.flood_processes,
                allowed_rps,
                limits.workspace_rate_per_minute,
            )
            process = ctx.Process(target=flooder, args=(flood, theirs))
            process.start()
            floods.append((process, mine))
        for _process, mine in floods:
            if not mine.poll(300):
                raise RuntimeError("the flooder did not open its streams")
            for k, v in mine.recv()[1].items():
                flood_open[k] = flood_open.get(k, 0) + v
        # Pacing, not synchronisation: the stream opens spent the burst allowance, and a flood
        # that spends as fast as allowed starts with a full one.
        spent = flood_open["streams_open"] + flood_open["streams_paced"]
        time.sleep(min(limits.workspace_burst_seconds, spent / allowed_rps) + 0.5)
        for _process, mine in floods:
            mine.send("go")
    cpu_before = tree_cpu(server)
    flooders = [psutil.Process(process.pid) for process, _mine in floods]
    flooders_before = sum(_cpu(f) for f in flooders)

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
    flooders_cpu = sum(_cpu(f) for f in flooders) - flooders_before
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
    flood_seconds = flood_counts.get("flood_ms", 0) / 1000 / max(1, len(floods))
    admitted = flood_counts.get("admitted", 0)
    return {
        "phase": "flood" if pace else "quiet",
        "flood_pace": pace or "-",
        "victim_frames": f"{frames}/{expected}",
        "victim_stream_ms_p50": round(percentile(latencies, 0.5) * 1000, 2),
        "victim_stream_ms_p99": round(percentile(latencies, 0.99) * 1000, 2),
        "victim_rest_ms_p50": round(percentile(rest, 0.5) * 1000, 2),
        "victim_rest_ms_p99": round(percentile(rest, 0.99) * 1000, 2),
        "flooder_streams_open": flood_open.get("streams_open", 0),
        "flooder_streams_refused": flood_open.get("streams_refused", 0),
        "flooder_requests_admitted": flood_counts.get("admitted", 0),
        "flooder_requests_refused": flood_counts.get("status_429", 0),
        "flooder_admitted_per_s": round(admitted / flood_seconds) if flood_seconds else 0,
        "flooder_streams_paced": flood_open.get("streams_paced", 0),
        "server_cpu_seconds": round(cpu, 2),
        # The load the flooder's own client puts on this box, which its real one would not.
        "flooder_client_cpu_seconds": round(flooders_cpu, 2),
        "load1": os.getloadavg()[0],
    }


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


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
            paces = args.flood_paces.split(",")
            for round_ in range(args.rounds):
                for pace in (None, paces[round_ % len(paces)]):
                    phases.append(
                        phase(
                            args,
                            pace,
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

    keys = (
        "victim_stream_ms_p50",
        "victim_stream_ms_p99",
        "victim_rest_ms_p50",
        "victim_rest_ms_p99",
    )

    def ratio(key: str, floods: list[dict[str, Any]]) -> float:
        calm = sorted(p[key] for p in quiet)[len(quiet) // 2]
        loud = sorted(p[key] for p in floods)[len(floods) // 2]
        return round(loud / calm, 2) if calm else float("inf")

    by_pace = {
        pace: {key: ratio(key, [p for p in flood if p["flood_pace"] == pace]) for key in keys}
        for pace in sorted({p["flood_pace"] for p in flood})
    }
    return {
        "phases": phases,
        # The worst over the flood's paces: what the other workspace may notice.
        "ratio_flood_over_quiet": {key: max(r[key] for r in by_pace.values()) for key in keys},
        "ratio_by_flood_pace": by_pace,
        "burst_seconds": Settings().workspace_burst_seconds,
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
    p.add_argument(
        "--flood-paces",
        default="allowed,fixed",
        help="the flood's pace, round by round: allowed (as fast as the limits admit without "
        "a refusal) or fixed (--flood-rps whatever the answers)",
    )
    p.add_argument("--flood-rps", type=float, default=2000.0, help="the fixed pace")
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
