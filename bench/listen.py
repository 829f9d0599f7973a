"""Listening benchmark: many calls, each with several WebSockets that listen to its audio (SPEC
5.3), beside the events of those calls, on one Switchboard server.

Starts `switchboard serve` on the embedded default (as `bench.fanout` does), creates C calls,
opens C x L call WebSockets from client worker processes, and every socket sends `listen`. Then
it runs phases on the same server, alternating "events" (events at `--rate` per call, no audio)
and "audio" (the same events, plus every call publishing one 640-byte chunk every 20 ms, real
time, from a separate publisher process), `--rounds` times. For each phase it reports event
latency (publish to client receive, p50 / p95 / p99, and by third of the phase), events
delivered of those expected, audio frames received, missing in each listener's sequence and
late, the server's CPU by process (gateway processes, the durable consumers' process, NATS,
Postgres) and memory, how far the durable consumers are behind, the clients' and publishers'
CPU (so a load generator that fell behind shows), the CPU the rest of the box used (other users
of a shared machine), the load average, and what the server logged (NATS's slow-consumer cuts
included). A phase ends when every event and every listener's last chunk has arrived, or
`--settle` seconds after publishing stopped. Loss is counted at the listeners: a `serve` with
several gateway processes answers /metrics from one of them.

    .venv/bin/python -m bench.listen --calls 200 --listeners 5 --rate 5 --seconds 15

The clients speak the WebSocket protocol themselves over asyncio (handshake, frame parsing, pong)
instead of through a library: at 50 binary frames a second per listener, a library client
would be the bottleneck long before the server. `--tiny` is a small run for a test.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import multiprocessing as mp
import os
import statistics
import struct
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import httpx
import nats
import orjson
import psutil

from bench.fanout import (
    machine,
    metric,
    percentile,
    publish,
    raise_fd_limit,
    start_server,
    stop_server,
)
from switchboard.events import EVENTS_STREAM, call_audio_subject
from switchboard.recorder.consumer import DURABLE as RECORDER
from switchboard.webhooks.router import DURABLE as ROUTER

CHUNK_BYTES = 640  # 20 ms of 16 kHz mono s16le (SPEC 5.3)
CHUNK_SECONDS = 0.02
# Each chunk the publisher sends starts with (phase, call index, sequence, send time), so a
# client can say which phase and which chunk of its call it got, and how late: the rest is
# silence.
CHUNK_HEADER = struct.Struct("<HHId")
CHUNK_PAD = bytes(CHUNK_BYTES - CHUNK_HEADER.size)
AUDIO_LATENCY_EVERY = 16  # sample one chunk in 16 for audio latency (memory stays bounded)
LATENCY_SAMPLE_CAP = 200_000
OPEN_BATCH = 50  # handshakes in flight at once per worker
DROPPED_EVENTS = "switchboard_frames_dropped_total"
EVENTS_SENT = 'switchboard_frames_sent_total{kind="call_websocket"}'
AUDIO_SENT = 'switchboard_audio_bytes_sent_total{kind="call_websocket"}'
AUDIO_DROPPED = 'switchboard_audio_chunks_dropped_total{kind="call_websocket"}'


@dataclass
class Plan:
    host: str
    port: int
    key: str
    sockets: list[str]  # the call id of each socket


# --- client workers (separate processes) ----------------------------------------------------


@dataclass
class Tally:
    """What one worker's sockets received, by phase (a chunk carries its phase; an event is
    counted in the phase under way, and every phase settles before the next starts)."""

    phase: int = 0
    events: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    latencies: defaultdict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    sent_times: defaultdict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    audio: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    audio_bytes: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    audio_latencies: defaultdict[int, list[float]] = field(
        default_factory=lambda: defaultdict(list)
    )
    gaps: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    # `stream.gap` notices: the server dropped events for a socket and says how many.
    gap_notices: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    events_in_gaps: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    out_of_order: int = 0  # a chunk older than one its socket already had: must stay 0
    wrong_size: int = 0  # a binary frame that is not 640 bytes: must stay 0
    other_text: int = 0  # replayed history, command results
    listening: int = 0
    refused: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    listening_all: asyncio.Event = field(default_factory=asyncio.Event)
    expected: int = 0


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 5.3) with a short payload (under 126 bytes)."""
    key = os.urandom(4)
    masked = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + key + masked


class Listener(asyncio.Protocol):
    """One call WebSocket that listens: the upgrade, then `listen`, then every frame counted."""

    def __init__(self, plan: Plan, call_id: str, tally: Tally, opened: asyncio.Future[None]):
        self.plan, self.call_id, self.tally, self.opened = plan, call_id, tally, opened
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = False
        self.last_seq: dict[int, int] = {}  # phase -> last chunk sequence seen

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport = cast(asyncio.Transport, transport)
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            f"GET /v1/calls/{self.call_id}/stream HTTP/1.1\r\n"
            f"Host: {self.plan.host}:{self.plan.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {self.plan.key}\r\n\r\n".encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before the upgrade: {exc!r}"))
        elif self.upgraded:
            self.tally.closed.append(f"{self.call_id}: connection lost ({exc!r})")

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buffer[: buffer.find(b"\r\n")])
            del buffer[: end + 4]
            if b" 101 " not in status:
                self.opened.set_exception(ConnectionError(status.decode(errors="replace")))
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = True
            self.opened.set_result(None)
            assert self.transport is not None
            self.transport.write(client_frame(0x1, b'{"action":"listen","request_id":"l"}'))
        self._frames()

    def _frames(self) -> None:
        buffer, tally = self.buffer, self.tally
        size, at = len(buffer), 0
        while size - at >= 2:
            first, length = buffer[at], buffer[at + 1] & 0x7F
            head = 2
            if length == 126:
                if size - at < 4:
                    break
                length, head = (buffer[at + 2] << 8) | buffer[at + 3], 4
            elif length == 127:
                if size - at < 10:
                    break
                length, head = int.from_bytes(buffer[at + 2 : at + 10], "big"), 10
            start = at + head
            end = start + length
            if end > size:
                break
            opcode = first & 0x0F
            if opcode == 0x2:
                self._audio(buffer, start, length)
            elif opcode == 0x1:
                self._text(bytes(buffer[start:end]))
            elif opcode == 0x9:  # ping: pong with its payload, or the server closes us
                assert self.transport is not None
                self.transport.write(client_frame(0xA, bytes(buffer[start:end])))
            elif opcode == 0x8:
                code = int.from_bytes(buffer[start : start + 2], "big") if length >= 2 else 0
                tally.closed.append(f"{self.call_id}: close {code}")
                assert self.transport is not None
                self.transport.close()
            at = end
        del buffer[:at]

    def _audio(self, buffer: bytearray, start: int, length: int) -> None:
        tally = self.tally
        if length != CHUNK_BYTES:
            tally.wrong_size += 1
            return
        phase, _call, seq, sent = CHUNK_HEADER.unpack_from(buffer, start)
        tally.audio[phase] += 1
        tally.audio_bytes[phase] += length
        last = self.last_seq.get(phase, -1)
        if seq <= last:
            tally.out_of_order += 1
        else:
            tally.gaps[phase] += seq - last - 1
            self.last_seq[phase] = seq
        if seq % AUDIO_LATENCY_EVERY == 0:
            sample = tally.audio_latencies[phase]
            if len(sample) < LATENCY_SAMPLE_CAP:
                sample.append(time.time() - sent)

    def _text(self, text: bytes) -> None:
        tally = self.tally
        if b'"sent_at"' in text:
            sent = orjson.loads(text)["payload"]["sent_at"]
            phase = tally.phase
            tally.events[phase] += 1
            sample = tally.latencies[phase]
            if len(sample) < LATENCY_SAMPLE_CAP:
                sample.append(time.time() - sent)
                tally.sent_times[phase].append(sent)
            return
        tally.other_text += 1
        if b'"stream.gap"' in text:
            tally.gap_notices[tally.phase] += 1
            tally.events_in_gaps[tally.phase] += int(orjson.loads(text).get("dropped") or 0)
        elif b'"command.result"' in text:
            result = orjson.loads(text)
            if result.get("ok") is True:
                tally.listening += 1
                if tally.listening == tally.expected:
                    tally.listening_all.set()
            else:
                tally.refused.append(f"{self.call_id}: {result}")


async def _open(plan: Plan, call_id: str, tally: Tally) -> Listener:
    loop = asyncio.get_running_loop()
    opened: asyncio.Future[None] = loop.create_future()
    _, listener = await loop.create_connection(
        lambda: Listener(plan, call_id, tally, opened), plan.host, plan.port
    )
    await asyncio.wait_for(opened, 60)
    return listener


def _cpu() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


def worker(plan: Plan, conn: Connection) -> None:
    """Opens the plan's sockets, has each listen, then answers the driver: ("phase", k) starts
    counting phase k, ("count", k, last) gives what phase k got so far and how many sockets
    have chunk `last` of it, ("report", k) everything."""
    import uvloop

    async def main() -> None:
        tally = Tally(expected=len(plan.sockets))
        listeners: list[Listener] = []
        for at in range(0, len(plan.sockets), OPEN_BATCH):
            batch = plan.sockets[at : at + OPEN_BATCH]
            listeners += await asyncio.gather(*(_open(plan, c, tally) for c in batch))
        try:
            await asyncio.wait_for(tally.listening_all.wait(), 60)
        except TimeoutError:
            raise RuntimeError(
                f"{tally.listening} of {len(plan.sockets)} sockets listening after 60 s; "
                f"refused: {tally.refused[:3]}, closed: {tally.closed[:3]}"
            ) from None
        conn.send(("listening", tally.listening))
        loop = asyncio.get_running_loop()
        cpu_at: dict[int, float] = {}
        while True:
            message = await loop.run_in_executor(None, conn.recv)
            verb, phase = message[:2]
            if verb == "phase":
                tally.phase = phase
                cpu_at[phase] = _cpu()
                conn.send(("ok", phase))
            elif verb == "count":
                last = message[2]
                finished = sum(1 for s in listeners if s.last_seq.get(phase) == last)
                conn.send((tally.events[phase], tally.audio[phase], finished))
            elif verb == "report":
                conn.send(
                    {
                        "events": tally.events[phase],
                        "latencies": tally.latencies[phase],
                        "sent_times": tally.sent_times[phase],
                        "audio": tally.audio[phase],
                        "gaps": tally.gaps[phase],
                        "gap_notices": tally.gap_notices[phase],
                        "events_in_gaps": tally.events_in_gaps[phase],
                        "audio_bytes": tally.audio_bytes[phase],
                        "audio_latencies": tally.audio_latencies[phase],
                        "cpu": _cpu() - cpu_at[phase],
                        "out_of_order": tally.out_of_order,
                        "wrong_size": tally.wrong_size,
                        "closed": list(tally.closed),
                    }
                )
            else:  # "stop"
                break
        for listener in listeners:
            if listener.transport is not None:
                listener.transport.close()

    uvloop.run(main())


# --- the audio publisher (a separate process, so its pace does not depend on the events') ----


async def publish_audio(
    client: Any, workspace_id: str, calls: list[str], phase: int, seconds: float
) -> dict[str, Any]:
    """One chunk per call every 20 ms for `seconds`, the calls staggered evenly across each 20
    ms as independent media planes would be, on a steady clock (behind, it catches up)."""
    subjects = [call_audio_subject(workspace_id, c) for c in calls]
    count = len(calls)
    ticks = max(1, round(seconds / CHUNK_SECONDS))
    total = ticks * count
    pack, pad = CHUNK_HEADER.pack, CHUNK_PAD
    cpu0 = _cpu()
    started = time.monotonic()
    lag_max = 0.0
    sent = 0
    while sent < total:
        tick, index = divmod(sent, count)
        due = started + (tick + index / count) * CHUNK_SECONDS
        now = time.monotonic()
        if due - now > 0.001:
            await asyncio.sleep(due - now)
            continue
        lag_max = max(lag_max, now - due)
        await client.publish(subjects[index], pack(phase, index, tick, time.time()) + pad)
        sent += 1
    await client.flush()
    elapsed = time.monotonic() - started
    return {
        "chunks_per_call": ticks,
        "published": sent,
        "seconds": elapsed,
        "rate_per_call": ticks / elapsed,
        "lag_ms_max": lag_max * 1000,
        "cpu": _cpu() - cpu0,
    }


def audio_publisher(nats_url: str, workspace_id: str, calls: list[str], conn: Connection) -> None:
    """Waits for ("go", phase, seconds), publishes, answers with what it did; "stop" ends it."""
    import uvloop

    async def main() -> None:
        client = await nats.connect(nats_url)
        loop = asyncio.get_running_loop()
        conn.send("ready")
        while True:
            message = await loop.run_in_executor(None, conn.recv)
            if message == "stop":
                break
            _go, phase, seconds = message
            conn.send(await publish_audio(client, workspace_id, calls, phase, seconds))
        await client.close()

    uvloop.run(main())


# --- the server's processes -------------------------------------------------------------------


GROUPS = ("gateway", "consumers", "supervisor", "nats", "postgres", "other")


class ServerTree:
    """The processes of one `serve`, by what they do. The gateway processes are those listening
    on the server's port: the serve process itself when it runs everything in one process, or
    its `--workers` gateway processes, beside a process for the durable consumers (recorder,
    webhook router) and the supervisor."""

    def __init__(self, server: psutil.Process, port: int):
        self.server = server
        self.gateways = sorted(
            {c.pid for c in psutil.net_connections("tcp") if _listens_on(c, port) and c.pid}
        )

    def group(self, process: psutil.Process) -> str:
        if process.pid in self.gateways:
            return "gateway"
        if process.pid == self.server.pid:
            return "supervisor"
        name = process.name()
        if "nats" in name:
            return "nats"
        if "postgres" in name or "postmaster" in name:
            return "postgres"
        with contextlib.suppress(psutil.Error):
            if "spawn_main" in " ".join(process.cmdline()):
                return "consumers"
        return "other"

    def processes(self) -> list[psutil.Process]:
        return [self.server, *self.server.children(recursive=True)]

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far by group, each process with the children it reaped: Postgres forks
        a backend per connection, and a backend that exits between two readings must move
        into its postmaster's total, not vanish from the sum. Gateways also one by one."""
        cpu = dict.fromkeys(GROUPS, 0.0)
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                busy = times.user + times.system + times.children_user + times.children_system
                cpu[self.group(process)] += busy
                if process.pid in self.gateways:
                    cpu[f"gateway {process.pid}"] = busy
        return cpu

    def memory(self) -> dict[str, float]:
        """MiB: the gateway processes' RSS and PSS (summed), the consumers' PSS, and the PSS of
        the whole tree (shared pages counted once, which RSS summed over Postgres's processes
        would not)."""
        rss = pss = consumers = tree = 0.0
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                info = process.memory_full_info()
                group = self.group(process)
                tree += info.pss
                if group == "gateway":
                    rss += info.rss
                    pss += info.pss
                elif group == "consumers":
                    consumers += info.pss
        mib = 2**20
        return {
            "gateway_rss_mib": round(rss / mib, 1),
            "gateway_pss_mib": round(pss / mib, 1),
            "consumers_pss_mib": round(consumers / mib, 1),
            "tree_pss_mib": round(tree / mib, 1),
        }


def _listens_on(connection: Any, port: int) -> bool:
    return bool(connection.status == psutil.CONN_LISTEN and connection.laddr.port == port)


def consumers_behind(nats_url: str) -> dict[str, int]:
    """Events the durable consumers (the recorder, the webhook router) have yet to take or
    acknowledge: how far the durable path is behind the bus."""

    async def ask() -> dict[str, int]:
        client = await nats.connect(nats_url)
        try:
            js = client.jetstream()
            behind = {}
            for durable in (RECORDER, ROUTER):
                info = await js.consumer_info(EVENTS_STREAM, durable, timeout=10)
                behind[durable] = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
            return behind
        finally:
            await client.close()

    try:
        return asyncio.run(ask())
    except Exception as failure:  # a figure missing must not end the run
        return {"error": repr(failure)}  # type: ignore[dict-item]


def server_warnings(data_dir: Path) -> dict[str, Any]:
    """What the server logged at warning level or above during the run (it logs nothing else
    here): how many lines, and the first few distinct ones."""
    lines: list[str] = []
    with contextlib.suppress(OSError):
        lines = (data_dir / "server.log").read_text(errors="replace").splitlines()
    distinct: list[str] = []
    for line in lines:
        text = line[:300]
        if text not in distinct and len(distinct) < 8:
            distinct.append(text)
    # NATS cuts a client that reads too slowly ("Slow Consumer"): core NATS (audio) it held
    # for that client is then gone, and nothing in the gateway counts it.
    slow: list[str] = []
    for log in data_dir.glob("**/nats.log"):
        with contextlib.suppress(OSError):
            slow += [x[:300] for x in log.read_text(errors="replace").splitlines() if "Slow" in x]
    return {
        "lines": len(lines),
        "sample": distinct,
        "nats_slow_consumer": len(slow),
        "nats_slow_consumer_sample": slow[:4],
    }


def box_busy() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, wall seconds), for what everyone else used."""
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    return float(sum(times) - idle), time.monotonic()


# --- the driver -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-") as scratch:
        process, url, key = start_server(Path(scratch), args.server_workers)
        if not url or not key:
            process.kill()
            log = (Path(scratch) / "server.log").read_text()[-2000:]
            raise RuntimeError(f"the server did not start:\n{log}")
        server = psutil.Process(process.pid)
        try:
            return _measure(args, url, key, server, Path(scratch))
        finally:
            stop_server(process)


class Session:
    """The processes of one run: client workers, the audio publisher, and the driver's view of
    the server (HTTP for /metrics, psutil for CPU and memory)."""

    def __init__(self, args: argparse.Namespace, url: str, key: str, server: psutil.Process):
        self.args, self.url, self.key = args, url, key
        self.tree = ServerTree(server, int(url.rsplit(":", 1)[1]))
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"})
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        self.audio_pipe: Connection | None = None

    def ask(self, message: tuple[Any, ...], patience: float = 60) -> list[Any]:
        for pipe in self.pipes:
            pipe.send(message)
        answers = []
        for pipe in self.pipes:
            if not pipe.poll(patience):
                raise RuntimeError(f"a client worker did not answer {message!r}")
            answers.append(pipe.recv())
        return answers

    def metrics(self) -> str:
        return self.http.get("/metrics", timeout=30).text

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop", 0))
        if self.audio_pipe is not None:
            with contextlib.suppress(OSError):
                self.audio_pipe.send("stop")
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        self.http.close()


def _measure(
    args: argparse.Namespace, url: str, key: str, server: psutil.Process, data_dir: Path
) -> dict[str, Any]:
    load_start = os.getloadavg()
    session = Session(args, url, key, server)
    try:
        return _phases(args, session, data_dir, load_start)
    finally:
        session.close()


def _phases(
    args: argparse.Namespace,
    session: Session,
    data_dir: Path,
    load_start: tuple[float, float, float],
) -> dict[str, Any]:
    http, tree = session.http, session.tree
    workspace_id = http.get("/v1/workspace", timeout=30).json()["id"]
    calls = []
    for _ in range(args.calls):
        response = http.post(
            "/v1/calls",
            json={"to_number": "+14155550100", "from_number": "+14155550101"},
            timeout=30,
        )
        response.raise_for_status()
        calls.append(response.json()["id"])
    nats_url = orjson.loads((data_dir / "run.json").read_bytes())["nats_url"]
    memory_idle = tree.memory()

    # Socket n listens to call n % C, so each worker's share spreads over the calls.
    sockets = [calls[n % len(calls)] for n in range(len(calls) * args.listeners)]
    host, port = session.url.removeprefix("http://").split(":")
    ctx = mp.get_context("spawn")
    shares = [sockets[w :: args.workers] for w in range(args.workers)]
    for share in shares:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(Plan(host, int(port), session.key, share), child))
        proc.start()
        session.pipes.append(parent)
        session.procs.append(proc)
    parent, child = ctx.Pipe()
    publisher = ctx.Process(target=audio_publisher, args=(nats_url, workspace_id, calls, child))
    publisher.start()
    session.audio_pipe = parent
    session.procs.append(publisher)
    opening = time.monotonic()
    listening = 0
    for pipe in session.pipes:
        if not pipe.poll(300):
            raise RuntimeError("a client worker did not open its sockets (see its traceback)")
        listening += pipe.recv()[1]
    open_seconds = time.monotonic() - opening
    if not parent.poll(60) or parent.recv() != "ready":
        raise RuntimeError("the audio publisher did not connect to NATS")
    memory_open = tree.memory()

    phases: list[dict[str, Any]] = []
    number = 0
    for round_ in range(1, args.rounds + 1):
        for audio in (False, True):
            number += 1
            phases.append(
                _phase(args, session, number, round_, audio, calls, nats_url, workspace_id)
            )
    workers_closed = session.ask(("report", number))
    closed = [line for answer in workers_closed for line in answer["closed"]]
    result: dict[str, Any] = {
        "calls": args.calls,
        "listeners_per_call": args.listeners,
        "sockets_listening": listening,
        "open_seconds": round(open_seconds, 1),
        "rate_per_call": args.rate,
        "seconds_per_phase": args.seconds,
        "rounds": args.rounds,
        "workers": args.workers,
        "gateway_processes": len(session.tree.gateways),
        # Each gateway process keeps its own /metrics, and one request reaches one of them: the
        # figures taken from /metrics cover every process only when there is one.
        "metrics_cover_all_gateways": len(session.tree.gateways) == 1,
        "phases": phases,
        "summary": summarize(phases, args),
        "sockets_closed": len(closed),
        "sockets_closed_sample": closed[:5],
        "out_of_order_chunks": sum(a["out_of_order"] for a in workers_closed),
        "server_log_warnings": server_warnings(data_dir),
        "wrong_size_frames": sum(a["wrong_size"] for a in workers_closed),
        "memory_idle": memory_idle,
        "memory_open": memory_open,
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "machine": machine(),
    }
    return result


def _phase(
    args: argparse.Namespace,
    session: Session,
    number: int,
    round_: int,
    audio: bool,
    calls: list[str],
    nats_url: str,
    workspace_id: str,
) -> dict[str, Any]:
    tree = session.tree
    session.ask(("phase", number))
    metrics0 = session.metrics()
    cpu0, driver0, (box0, wall0) = tree.cpu(), _cpu(), box_busy()
    began = time.time()
    if audio:
        assert session.audio_pipe is not None
        session.audio_pipe.send(("go", number, args.seconds))
    sent, achieved = asyncio.run(
        publish(nats_url, workspace_id, calls, args.rate, args.seconds, {"ws"})
    )
    published_audio: dict[str, Any] = {"chunks_per_call": 0, "published": 0}
    if audio:
        assert session.audio_pipe is not None
        if not session.audio_pipe.poll(args.seconds + 60):
            raise RuntimeError("the audio publisher did not finish its phase")
        published_audio = session.audio_pipe.recv()
    publish_end = time.monotonic()
    publish_seconds = publish_end - wall0
    metrics_published = session.metrics()
    memory = tree.memory()
    behind_published = consumers_behind(nats_url)

    # Every call got sent // C events, the first sent % C one more (fanout.publish goes round).
    per_call = {c: sent // len(calls) + (i < sent % len(calls)) for i, c in enumerate(calls)}
    events_expected = sum(
        per_call[calls[n % len(calls)]] for n in range(len(calls) * args.listeners)
    )
    audio_expected = published_audio["chunks_per_call"] * len(calls) * args.listeners

    # Settle: until every event arrived (or was dropped) and every listener has its call's last
    # chunk of the phase (a full listener buffer drops its oldest chunks, never the newest, so
    # the last one comes unless something else lost it), or the deadline.
    last_chunk = published_audio["chunks_per_call"] - 1
    deadline = time.monotonic() + args.settle
    while True:
        counts = session.ask(("count", number, last_chunk))
        events = sum(c[0] for c in counts)
        finished = sum(c[2] for c in counts)
        metrics1 = session.metrics()
        audio_dropped = metric(metrics1, AUDIO_DROPPED) - metric(metrics0, AUDIO_DROPPED)
        events_dropped = metric(metrics1, DROPPED_EVENTS) - metric(metrics0, DROPPED_EVENTS)
        settled = events + events_dropped >= events_expected and (
            not audio or finished == len(calls) * args.listeners
        )
        if settled or time.monotonic() >= deadline:
            break
        time.sleep(0.05)  # polling a condition, bounded by the deadline
    cpu1, driver1, (box1, wall1) = tree.cpu(), _cpu(), box_busy()
    settle_seconds = time.monotonic() - publish_end
    behind_settled = consumers_behind(nats_url)
    reports = session.ask(("report", number))
    latencies = [x for r in reports for x in r["latencies"]]
    # Latency of the events sent in each third of the phase: a backlog that grows shows here.
    thirds: list[list[float]] = [[], [], []]
    for r in reports:
        for at, latency in zip(r["sent_times"], r["latencies"], strict=True):
            thirds[min(2, max(0, int((at - began) / args.seconds * 3)))].append(latency)
    audio_latencies = [x for r in reports for x in r["audio_latencies"]]
    window = wall1 - wall0
    server_used = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
    server_total = sum(server_used[group] for group in GROUPS)  # not the gateways one by one
    clients = [r["cpu"] for r in reports]
    ours = server_total + sum(clients) + (driver1 - driver0) + published_audio.get("cpu", 0.0)
    audio_sent_bytes = metric(metrics1, AUDIO_SENT) - metric(metrics0, AUDIO_SENT)
    # What the server wrote while the load was offered, against what was offered.
    audio_written = (metric(metrics_published, AUDIO_SENT) - metric(metrics0, AUDIO_SENT)) / 640
    events_written = metric(metrics_published, EVENTS_SENT) - metric(metrics0, EVENTS_SENT)

    def ms(values: list[float], q: float) -> float:
        return round(percentile(values, q) * 1000, 2)

    return {
        "phase": number,
        "round": round_,
        "kind": "events+audio" if audio else "events",
        "window_seconds": round(window, 2),
        "settle_seconds": round(settle_seconds, 2),
        "settled": settled,
        "events_published": sent,
        "event_publish_rate": round(achieved, 1),
        "events_expected": events_expected,
        "events_delivered": sum(r["events"] for r in reports),
        "events_dropped_server": int(events_dropped),
        # What the sockets were told they missed (`stream.gap` notices and their counts).
        "event_gap_notices": sum(r["gap_notices"] for r in reports),
        "events_in_gap_notices": sum(r["events_in_gaps"] for r in reports),
        "event_latency_ms_p50": ms(latencies, 0.50),
        "event_latency_ms_p95": ms(latencies, 0.95),
        "event_latency_ms_p99": ms(latencies, 0.99),
        "event_latency_ms_max": round(max(latencies, default=float("nan")) * 1000, 2),
        "event_latency_ms_p50_by_third": [ms(third, 0.50) for third in thirds],
        "events_written_per_s_while_publishing": round(events_written / publish_seconds),
        "events_offered_per_s": round(events_expected / args.seconds),
        "audio_chunks_published": published_audio["published"],
        "audio_publish_rate_per_call": round(published_audio.get("rate_per_call", 0.0), 2),
        "audio_publish_lag_ms_max": round(published_audio.get("lag_ms_max", 0.0), 1),
        "audio_frames_expected": audio_expected,
        "audio_frames_received": sum(r["audio"] for r in reports),
        # Chunks a listener never got, before its last one (dropped anywhere: a full listener
        # buffer, a NATS slow-consumer cut), and listeners without their call's last chunk.
        "audio_frames_missing_in_sequence": sum(r["gaps"] for r in reports),
        "audio_listeners_without_last_chunk": len(calls) * args.listeners - finished
        if audio
        else 0,
        "audio_bytes_received": sum(r["audio_bytes"] for r in reports),
        "audio_bytes_sent_server": int(audio_sent_bytes),
        "audio_chunks_dropped_server": int(audio_dropped),
        "audio_frames_written_per_s_while_publishing": round(audio_written / publish_seconds),
        "audio_frames_offered_per_s": round(audio_expected / args.seconds),
        "audio_latency_ms_p50": ms(audio_latencies, 0.50),
        "audio_latency_ms_p99": ms(audio_latencies, 0.99),
        "server_cpu_seconds": round(server_total, 2),
        "server_cpu_by_process": {k: round(v, 2) for k, v in server_used.items()},
        "server_cores": round(server_total / window, 3),
        "gateway_cores": round(server_used["gateway"] / window, 3),
        "consumers_cores": round(server_used["consumers"] / window, 3),
        "client_worker_cores": [round(c / window, 3) for c in clients],
        "audio_publisher_cores": round(published_audio.get("cpu", 0.0) / window, 3),
        "driver_cores": round((driver1 - driver0) / window, 3),
        # The rest of the machine's busy time: other users of a shared box (and the kernel).
        "others_cores": round(max(0.0, (box1 - box0) - ours) / window, 3),
        "memory": memory,
        "durable_consumers_behind_at_publish_end": behind_published,
        "durable_consumers_behind_at_settle": behind_settled,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def summarize(phases: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Medians over the rounds of each kind, and what audio cost the gateway process.

    The cost is read round by round: the gateway processes' CPU in the audio phase, less what
    the events alone cost them per second (the round's events phase) over the audio phase's
    window, divided by the audio frames delivered. Where the recorder and the webhook router
    run in a gateway process (a serve with one process), their work is in that difference
    too when they fall behind (see `durable_consumers_behind_*`)."""

    def median(values: list[float]) -> float:
        return float(statistics.median(values)) if values else float("nan")

    def of(kind: str, key: str) -> float:
        return median([p[key] for p in phases if p["kind"] == kind])

    keys = ("event_latency_ms_p50", "event_latency_ms_p99", "server_cores", "gateway_cores")
    summary: dict[str, Any] = {
        kind: {key: round(of(kind, key), 3) for key in keys} for kind in ("events", "events+audio")
    }
    per_frame = []
    for alone, audio in zip(phases[0::2], phases[1::2], strict=False):
        frames = audio["audio_frames_received"]
        if frames:
            extra = audio["server_cpu_by_process"]["gateway"] - (
                alone["gateway_cores"] * audio["window_seconds"]
            )
            per_frame.append(extra / frames)
    cost = median(per_frame)
    summary["audio_extra_server_cores"] = round(
        of("events+audio", "server_cores") - of("events", "server_cores"), 3
    )
    summary["audio_extra_gateway_cores"] = round(
        of("events+audio", "gateway_cores") - of("events", "gateway_cores"), 3
    )
    summary["audio_gateway_us_per_frame"] = round(cost * 1e6, 2)
    # A listener gets 50 frames a second: thousandths of a core each listener costs.
    summary["audio_gateway_millicores_per_listener"] = round(cost / CHUNK_SECONDS * 1000, 3)
    return summary


def table(result: dict[str, Any]) -> str:
    head = (
        "phase kind          events dlv/exp   ev p50/p95/p99 ms       ev p50 by third ms    "
        "audio rcv/exp        gaps  au/s wrote/offered  au p50/p99 ms    "
        "server cores (gw, cons)  clients  others  RSS/PSS MiB  load"
    )
    lines = [head]
    for p in result["phases"]:
        third = "/".join(f"{x:.0f}" for x in p["event_latency_ms_p50_by_third"])
        lines.append(
            f"{p['phase']:>5} {p['kind']:<13} "
            f"{p['events_delivered']:>7}/{p['events_expected']:<7} "
            f"{p['event_latency_ms_p50']:>7.1f}/{p['event_latency_ms_p95']:>7.1f}/"
            f"{p['event_latency_ms_p99']:>7.1f}  {third:<21} "
            f"{p['audio_frames_received']:>9}/{p['audio_frames_expected']:<9} "
            f"{p['audio_frames_missing_in_sequence']:>6} "
            f"{p['audio_frames_written_per_s_while_publishing']:>7}/"
            f"{p['audio_frames_offered_per_s']:<8} "
            f"{p['audio_latency_ms_p50']:>7.1f}/{p['audio_latency_ms_p99']:<7.1f} "
            f"{p['server_cores']:>7.2f} ({p['gateway_cores']:.2f}, {p['consumers_cores']:.2f})  "
            f"{max(p['client_worker_cores']):>7.2f} {p['others_cores']:>7.2f} "
            f"{p['memory']['gateway_rss_mib']:>6.0f}/{p['memory']['gateway_pss_mib']:<5.0f} "
            f"{p['load_average_1m']:>5.2f}"
        )
    s = result["summary"]
    lines.append(
        f"audio added {s['audio_extra_server_cores']:.3f} server cores "
        f"({s['audio_extra_gateway_cores']:.3f} in the gateway processes), "
        f"{s['audio_gateway_us_per_frame']:.1f} us of gateway CPU per audio frame, "
        f"{s['audio_gateway_millicores_per_listener']:.2f} millicores per listener; "
        f"load average {result['load_average_start'][0]} -> {result['load_average_end'][0]}; "
        f"server log: {result['server_log_warnings']['lines']} warning lines; NATS slow "
        f"consumer: {result['server_log_warnings']['nats_slow_consumer']}"
    )
    return "\n".join(lines)


def tiny() -> argparse.Namespace:
    """A run small enough for a test: 4 calls x 2 listeners, one round of short phases."""
    return argparse.Namespace(
        calls=4,
        listeners=2,
        rate=10.0,
        seconds=1.5,
        rounds=1,
        workers=1,
        settle=10.0,
        server_workers=None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--listeners", type=int, default=5, help="listening sockets per call")
    parser.add_argument("--rate", type=float, default=5.0, help="events per call per second")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of phases (events, audio)")
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds a phase may take to deliver its tail"
    )
    parser.add_argument(
        "--server-workers",
        type=int,
        default=None,
        help="serve's gateway processes (default: its own)",
    )
    parser.add_argument("--tiny", action="store_true", help="a few seconds' run (for a test)")
    args = parser.parse_args()
    if args.tiny:
        args = argparse.Namespace(**{**vars(tiny()), "server_workers": args.server_workers})
    result = run(args)
    print(table(result))
    print(orjson.dumps(result).decode())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
