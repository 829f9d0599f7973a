"""Fan-out benchmark: N live streams (SSE and WebSocket) on one Switchboard server.

Starts `switchboard serve` on the embedded default, opens N streams across C calls from client
worker processes, publishes events to NATS at a given rate with the send time inside each one,
and reports frames delivered and dropped, publish-to-client latency (p50 / p95 / p99), server
CPU seconds and RSS per open stream, and the machine it ran on.

    .venv/bin/python -m bench.fanout --streams 1000 --calls 10 --rate 20 --seconds 10

The load generator must not be the bottleneck: the report gives the client workers' CPU use
(well under one core each means they kept up) and the publisher's achieved rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import psutil

from switchboard.events import call_events_subject, call_transcript_subject, make_envelope

LATENCY_SAMPLE_CAP = 200_000


@dataclass
class Plan:
    url: str
    key: str
    streams: list[tuple[str, str]]  # (kind: "sse" | "ws", call_id)


# --- client workers (separate processes) ----------------------------------------------------


async def _sse_client(
    url: str, key: str, call_id: str, stats: dict[str, Any], ready: asyncio.Event, opened: list[int]
) -> None:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
    writer.write(
        f"GET /v1/calls/{call_id}/transcript/stream HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {key}\r\n\r\n".encode()
    )
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    opened[0] += 1
    ready.set()
    marker = b"t="
    while True:
        line = await reader.readline()
        if not line:
            return
        at = line.find(marker)
        if line.startswith(b"data:") and at >= 0:
            sent = float(line[at + 2 : line.index(b" ", at) if b" " in line[at:] else -1])
            _record(stats, time.time() - sent)


async def _ws_client(
    url: str, key: str, call_id: str, stats: dict[str, Any], ready: asyncio.Event, opened: list[int]
) -> None:
    from websockets.asyncio.client import connect

    ws_url = url.replace("http://", "ws://") + f"/v1/calls/{call_id}/stream"
    async with connect(
        ws_url,
        additional_headers={"Authorization": f"Bearer {key}"},
        ping_interval=None,
        max_queue=None,
    ) as socket:
        opened[0] += 1
        ready.set()
        async for text in socket:
            sent = orjson.loads(text)["payload"].get("sent_at")
            if sent is not None:  # not the replayed history (call.initiated)
                _record(stats, time.time() - sent)


def _record(stats: dict[str, Any], latency: float) -> None:
    stats["frames"] += 1
    if len(stats["latencies"]) < LATENCY_SAMPLE_CAP:
        stats["latencies"].append(latency)


def worker(plan: Plan, conn: Connection) -> None:
    import uvloop

    async def main() -> None:
        stats: dict[str, Any] = {"frames": 0, "latencies": []}
        opened = [0]
        ready = asyncio.Event()
        tasks = []
        for kind, call_id in plan.streams:
            client = _sse_client if kind == "sse" else _ws_client
            tasks.append(
                asyncio.create_task(client(plan.url, plan.key, call_id, stats, ready, opened))
            )
            if len(tasks) % 200 == 0:
                await asyncio.sleep(0)  # let the handshakes breathe
        while opened[0] < len(plan.streams):
            failed = [t for t in tasks if t.done() and t.exception()]
            if failed:
                raise RuntimeError(f"a stream failed to open: {failed[0].exception()!r}")
            await asyncio.sleep(0.05)
        cpu = psutil.Process().cpu_times()
        conn.send(("open", opened[0]))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, conn.recv)  # "stop"
        after = psutil.Process().cpu_times()
        busy = after.user + after.system - cpu.user - cpu.system
        conn.send(("done", stats["frames"], stats["latencies"], busy))
        for task in tasks:
            task.cancel()

    uvloop.run(main())


# --- the driver -------------------------------------------------------------------------------


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_server(
    data_dir: Path, server_workers: int | None = None, *, lift_limits: bool = True
) -> tuple[subprocess.Popen[str], str, str]:
    """`serve` on the embedded default; `server_workers` gateway processes (default: its own
    default, one per core). With `lift_limits`, the per-workspace quotas are lifted: every
    stream of a benchmark is in one workspace, and it measures streams, not refusals."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env["SWITCHBOARD_LOG_LEVEL"] = "warning"
    if lift_limits:
        env["SWITCHBOARD_WORKSPACE_MAX_STREAMS"] = "1000000"
        env["SWITCHBOARD_WORKSPACE_RATE_PER_MINUTE"] = "100000000"
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "switchboard", "serve", "--port", "0"),
            *("--data-dir", str(data_dir)),
            *(("--workers", str(server_workers)) if server_workers else ()),
        ],
        stdout=subprocess.PIPE,
        # The server's log goes beside its data, so the report on stdout stays clean JSON.
        stderr=open(data_dir / "server.log", "w"),  # noqa: SIM115 - lives as long as the server
        text=True,
        env=env,
    )
    url = key = ""
    assert process.stdout is not None
    for line in iter(process.stdout.readline, ""):
        if match := re.search(r"URL:\s+(\S+)", line):
            url = match.group(1)
        if match := re.search(r"API key:\s+(pk_live_\w+)", line):
            key = match.group(1)
        if line.startswith("  Try:"):
            break
    return process, url, key


def stop_server(process: subprocess.Popen[str]) -> None:
    """SIGTERM (the server drains and stops its embedded servers), a kill after a minute."""
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def tree(server: psutil.Process) -> list[psutil.Process]:
    """The server and everything it started: its workers, NATS and Postgres."""
    return [server, *server.children(recursive=True)]


def tree_cpu(server: psutil.Process) -> float:
    """CPU seconds (user + system) of the server's whole process tree, its exited processes
    included (each is counted in its parent once reaped: Postgres forks a backend per
    connection)."""
    return sum(tree_cpu_by_name(server).values())


def tree_cpu_by_name(server: psutil.Process) -> dict[str, float]:
    """`tree_cpu` by process name: `sb-api-1` ... and `sb-consumers` (a serve names its
    processes), `nats-server`, `postgres`, and the supervisor's `python`."""
    by_name: dict[str, float] = {}
    for process in tree(server):
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            used = times.user + times.system + times.children_user + times.children_system
            name = process.name()
            by_name[name] = by_name.get(name, 0.0) + used
    return by_name


def tree_pss_by_name(server: psutil.Process) -> dict[str, int]:
    """Proportional set size of the whole tree, by process name (as `tree_cpu_by_name`):
    shared pages (Postgres' buffers, the interpreter) counted once, not once per process."""
    by_name: dict[str, int] = {}
    for process in tree(server):
        with contextlib.suppress(psutil.Error):
            name = process.name()
            by_name[name] = by_name.get(name, 0) + process.memory_full_info().pss
    return by_name


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


HANDOFFS = "switchboard_stream_handoffs_total"


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.split()[-1])
    return total


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = psutil.virtual_memory().total / 2**30
    system = f"Linux {platform.release()}, Python {platform.python_version()}"
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, {system}"


async def publish(
    nats_url: str,
    workspace_id: str,
    calls: list[str],
    rate: float,
    seconds: float,
    kinds: set[str],
    burst: bool = False,
) -> tuple[int, float]:
    """Publishes `rate` events per call per second for `seconds`, the calls staggered evenly
    across each interval as independent calls would be, or with `burst` every call in the same
    instant at the start of each interval (a media plane under load flushes together); returns
    (sent, achieved/s)."""
    client = await nats.connect(nats_url)
    sent = 0
    step = 1.0 / rate / len(calls)
    started = time.monotonic()
    tick = 0
    while time.monotonic() - started < seconds:
        if burst and tick % len(calls) == 0:
            # Wait for the interval's start, then publish every call's event back to back.
            delay = started + (tick // len(calls)) / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        call_id = calls[tick % len(calls)]
        now = time.time()
        if "sse" in kinds:
            turn = {
                "role": "user",
                "text": f"t={now:.6f} hello",
                "is_final": False,
                "turn_id": "trn_bench00000000000",
                "ts": "2026-01-01T00:00:00.000Z",
            }
            await client.publish(call_transcript_subject(workspace_id, call_id), orjson.dumps(turn))
        if "ws" in kinds:
            envelope = make_envelope(
                "call.idle_silence",
                workspace_id=workspace_id,
                channel="voice",
                call_id=call_id,
                payload={"silence_ms": 1, "threshold_ms": 1, "sent_at": now},
            )
            await client.publish(call_events_subject(workspace_id, call_id), orjson.dumps(envelope))
        sent += 1
        tick += 1
        if burst:
            continue
        delay = started + tick * step - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    elapsed = time.monotonic() - started
    await client.flush()
    await client.close()
    return sent, sent / elapsed


def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-") as scratch:
        process, url, key = start_server(Path(scratch), args.server_workers)
        server = psutil.Process(process.pid)
        try:
            result = _measure(args, url, key, server, Path(scratch))
        finally:
            stopping = time.monotonic()
            stop_server(process)
        # How long a SIGTERM took to drain the streams and stop everything (the embedded
        # Postgres and NATS included); "killed" if it took over a minute.
        waited = time.monotonic() - stopping
        result["server_shutdown_seconds"] = round(waited, 1) if waited < 60 else "killed"
        return result


def _measure(
    args: argparse.Namespace, url: str, key: str, server: psutil.Process, data_dir: Path
) -> dict[str, Any]:
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    workspace_id = http.get("/v1/workspace").json()["id"]
    calls = [
        http.post(
            "/v1/calls", json={"to_number": "+14155550100", "from_number": "+14155550101"}
        ).json()["id"]
        for _ in range(args.calls)
    ]
    kinds = {"sse", "ws"} if args.kind == "mixed" else {args.kind}
    streams: list[tuple[str, str]] = []
    for n in range(args.streams):
        kind = ("sse", "ws")[n % 2] if args.kind == "mixed" else args.kind
        streams.append((kind, calls[n % len(calls)]))
    pss_before = tree_pss_by_name(server)
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for w in range(args.workers):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(Plan(url, key, streams[w :: args.workers]), child))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    for pipe in pipes:
        if not pipe.poll(300):
            raise RuntimeError("a client worker did not open its streams (see its traceback)")
    opened = sum(pipe.recv()[1] for pipe in pipes)
    time.sleep(1.0)  # let the server settle after the connection storm before measuring memory
    pss_open = tree_pss_by_name(server)
    metrics_before = http.get("/metrics").text
    cpu_before = tree_cpu_by_name(server)
    nats_url = orjson.loads((data_dir / "run.json").read_bytes())["nats_url"]
    sent, achieved = asyncio.run(
        publish(nats_url, workspace_id, calls, args.rate, args.seconds, kinds, args.burst)
    )
    time.sleep(1.0)  # the last frames in flight
    cpu_after = tree_cpu_by_name(server)
    cpu_by_name = {k: v - cpu_before.get(k, 0.0) for k, v in sorted(cpu_after.items())}
    cpu_used = sum(cpu_by_name.values())
    metrics_after = http.get("/metrics").text
    for pipe in pipes:
        pipe.send("stop")
    frames, latencies, client_cpu = 0, [], []
    for pipe in pipes:
        _tag, count, sample, cpu = pipe.recv()
        frames += count
        latencies += sample
        client_cpu.append(cpu)
    for proc in procs:
        proc.join(30)
    per_call_streams = args.streams / args.calls
    expected = int(sent * per_call_streams)
    dropped = metric(metrics_after, "switchboard_frames_dropped_total") - metric(
        metrics_before, "switchboard_frames_dropped_total"
    )
    return {
        "streams": opened,
        "kind": args.kind,
        "calls": args.calls,
        "rate_per_call": args.rate,
        "seconds": args.seconds,
        "published": sent,
        "publish_rate_achieved": round(achieved, 1),
        "frames_expected": expected,
        "frames_delivered": frames,
        "frames_dropped_server": int(dropped),
        # Stream affinity (api/affinity.py): connections passed to the worker that owns their
        # call, and those served where they landed because the owner could not take them.
        "stream_handoffs": {
            outcome: int(metric(metrics_after, f'{HANDOFFS}{{outcome="{outcome}"}}'))
            for outcome in ("passed", "kept")
        },
        "latency_ms_p50": round(percentile(latencies, 0.50) * 1000, 2),
        "latency_ms_p95": round(percentile(latencies, 0.95) * 1000, 2),
        "latency_ms_p99": round(percentile(latencies, 0.99) * 1000, 2),
        "server_cpu_seconds": round(cpu_used, 2),
        # Where it went: each gateway, the consumers (recorder, webhooks), NATS, Postgres.
        "server_cpu_by_process": {k: round(v, 2) for k, v in cpu_by_name.items()},
        "server_workers": args.server_workers or "default",
        "burst": args.burst,
        "cpu_s_per_100k_frames": round(cpu_used / max(1, frames) * 1e5, 2),
        "server_pss_mib_open": round(sum(pss_open.values()) / 2**20, 1),
        "pss_kib_per_stream": round(
            (sum(pss_open.values()) - sum(pss_before.values())) / 1024 / max(1, opened), 1
        ),
        "pss_kib_per_stream_by_process": {
            name: round((pss - pss_before.get(name, 0)) / 1024 / max(1, opened), 2)
            for name, pss in sorted(pss_open.items())
        },
        # CPU each client worker used while events flowed, as a share of one core: well under
        # 1.0 means the load generator kept up and the figures are the server's.
        "client_worker_core_share": [round(c / (args.seconds + 1.0), 2) for c in client_cpu],
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--rate", type=float, default=10.0, help="events per call per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--kind", choices=["sse", "ws", "mixed"], default="mixed")
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument(
        "--server-workers", type=int, default=None, help="serve --workers (default: its own)"
    )
    parser.add_argument(
        "--burst", action="store_true", help="every call publishes in the same instant"
    )
    args = parser.parse_args()
    result = run(args)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
