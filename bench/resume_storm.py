"""Resume-storm benchmark: N transcript streams on one replica, the replica restarted, every
client resuming with its `Last-Event-ID` about 50 final turns behind.

Postgres and NATS are started once by this process (the embedded servers of `switchboard.
embedded`, in a temporary folder) and given to `switchboard serve` by URL, so they outlive the
replica, as they would in production. The benchmark:

1. starts `serve`, creates a workspace and C calls, and opens N transcript SSE streams
   (`GET /v1/calls/{id}/transcript/stream`) from client worker processes, N/C per call;
2. publishes final turns (`switchboard.producer.Producer`) at a steady rate per call, each
   numbered in its text (`k=<n> c=<call>`), and keeps publishing until the end;
3. stops the replica with SIGTERM (it drains the streams over `SWITCHBOARD_DRAIN_SECONDS`,
   telling each client when to come back), and keeps publishing while it is down until about
   `--missed` finals per call have been stored that no client has seen;
4. restarts `serve` on the same port; in `storm` mode every client reconnects the moment the
   replica listens again (the worst case), in `hint` mode each obeys the `retry:` hint it was
   given and retries on refusal, as `EventSource` does;
5. measures, from the moment the new replica listens, until every stream has received every
   final published before that moment (its catch-up time), with the server's CPU and peak RSS
   over that window;
6. stops publishing, waits for every stream to have every final of its call, and checks that
   each stream received each one exactly once and in order, with cursors that only grow.

    .venv/bin/python -m bench.resume_storm --streams 5000 --calls 50 --rate 2 --missed 50

The load generator shares the machine: the report gives each client worker's share of a core
during the storm (one near 1.0 was itself a bottleneck), and how busy the whole machine was.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import multiprocessing as mp
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import psutil

from bench.fanout import machine, metric, percentile, raise_fd_limit, tree, tree_cpu
from switchboard.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from switchboard.producer import Producer

# What a turn says after its number: about the length of a spoken sentence.
FILLER = "and then I would like to move the appointment to Thursday afternoon if possible"
STREAM_KIND = 'kind="transcript_sse"'
PR_SET_PDEATHSIG = 1


@dataclass
class Plan:
    url: str
    key: str
    streams: list[tuple[int, str]]  # (call index, call id)
    reconnect: str  # "storm" | "hint"


# --- client workers (separate processes) ----------------------------------------------------


class Stream:
    """One transcript stream as a client sees it, across its connections."""

    __slots__ = (
        "call",
        "call_id",
        "connect_errors",
        "connected",
        "connections",
        "drained",
        "eof",
        "from_start",
        "gaps",
        "http_errors",
        "id_regressions",
        "k_at_drain",
        "ks",
        "last_id",
        "last_seq",
        "other_events",
        "resets",
        "resumed_at",
        "resumes",
        "retry_ms",
        "times",
        "waiting",
        "wrong_call",
    )

    def __init__(self, call: int, call_id: str) -> None:
        self.call = call
        self.call_id = call_id
        self.ks = array("I")  # the turn number of every final received, in arrival order
        self.times = array("d")  # when each arrived (Unix seconds)
        self.last_id: str | None = None
        self.last_seq = 0
        self.id_regressions = 0
        self.wrong_call = 0
        self.retry_ms = 3000
        self.k_at_drain: int | None = None
        self.resumed_at: float | None = None
        self.waiting = False
        self.connections = 0
        self.connected = False  # a response is being read now
        self.resumes = 0
        self.from_start = 0
        self.drained = 0
        self.eof = 0
        self.gaps = 0
        self.resets = 0
        self.connect_errors = 0
        self.http_errors: dict[int, int] = {}
        self.other_events: dict[str, int] = {}


class Worker:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        host, port = plan.url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.streams = [Stream(call, call_id) for call, call_id in plan.streams]
        self.opened = 0
        self.restarted = asyncio.Event()  # storm mode: the replica listens again
        self.t0 = 0.0
        self.targets: list[int] = []
        self.remaining = 0
        self.all_reached = asyncio.Event()

    # One connection: the request, the response head, then the chunked body as SSE events.
    async def session(self, stream: Stream) -> str:
        """Returns why it ended: "drained", "eof", "gap", "refused", "http", "end"."""
        resuming = stream.last_id is not None
        path = f"/v1/calls/{stream.call_id}/transcript/stream"
        head = f"Authorization: Bearer {self.plan.key}\r\n"
        if resuming:
            head += f"Last-Event-ID: {stream.last_id}\r\n"
        elif stream.connections:
            path += "?from=start"  # it had no cursor yet: everything, which it de-duplicates
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        except OSError:
            stream.connect_errors += 1
            return "refused"
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n{head}\r\n".encode())
            await writer.drain()
            try:
                response = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, OSError):
                stream.connect_errors += 1
                return "refused"
            status = int(response.split(b" ", 2)[1])
            if status != 200:
                stream.http_errors[status] = stream.http_errors.get(status, 0) + 1
                return "http"
            now = time.time()
            stream.connected = True
            stream.connections += 1
            if stream.connections == 1:
                self.opened += 1
            else:
                stream.resumes += resuming
                stream.from_start += not resuming
                if stream.resumed_at is None:  # the first connection to the new replica
                    stream.resumed_at = now
            return await self.read_events(stream, reader)
        except (asyncio.IncompleteReadError, OSError):
            return "eof"
        finally:
            stream.connected = False
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def read_events(self, stream: Stream, reader: asyncio.StreamReader) -> str:
        event = b""
        event_id: bytes | None = None
        data = b""
        while True:
            size_line = await reader.readline()
            if not size_line:
                return "eof"
            size = int(size_line.strip() or b"0", 16)
            if size == 0:
                return "eof"
            body = await reader.readexactly(size + 2)
            # The server writes whole events per chunk, so lines never straddle two chunks.
            for line in body[:-2].split(b"\n"):
                if not line:  # the end of an event: dispatch it
                    if data:
                        ended = self.dispatch(stream, event, event_id, data)
                        if ended is not None:
                            return ended
                    event, event_id, data = b"", None, b""
                elif line.startswith(b"data: "):
                    data = line[6:]
                elif line.startswith(b"id: "):
                    event_id = line[4:]
                elif line.startswith(b"event: "):
                    event = line[7:]
                elif line.startswith(b"retry: "):
                    stream.retry_ms = int(line[7:])

    def dispatch(
        self, stream: Stream, event: bytes, event_id: bytes | None, data: bytes
    ) -> str | None:
        if not event:
            now = time.time()
            at = data.index(b'"text":"k=') + 10
            k = int(data[at : data.index(b" ", at)])
            c = int(data[data.index(b"c=", at) + 2 : data.index(b" ", data.index(b"c=", at))])
            if c != stream.call:
                stream.wrong_call += 1
            stream.ks.append(k)
            stream.times.append(now)
            if event_id is None:
                stream.id_regressions += 1  # a frame without its cursor
            else:
                text = event_id.decode()
                seq = int(text[1:])
                if seq <= stream.last_seq:
                    stream.id_regressions += 1
                stream.last_seq = seq
                stream.last_id = text
            if stream.waiting and k >= self.targets[stream.call]:
                self.reached(stream)
            return None
        name = event.decode()
        if name == "error":
            if b"UNAVAILABLE" in data:
                stream.drained += 1
                return "drained"
            stream.other_events[name] = stream.other_events.get(name, 0) + 1
            return "eof"
        if name == "gap":
            # SPEC 5.4: reconnect from the cursor before the gap to get the dropped frames.
            stream.gaps += 1
            stream.last_id = orjson.loads(data).get("resume_from") or stream.last_id
            return "gap"
        if name == "reset":
            stream.resets += 1
            return None
        stream.other_events[name] = stream.other_events.get(name, 0) + 1
        return "end" if name == "end" else None

    def reached(self, stream: Stream) -> None:
        stream.waiting = False
        self.remaining -= 1
        if self.remaining == 0:
            self.all_reached.set()

    async def client(self, stream: Stream) -> None:
        while True:
            ended = await self.session(stream)
            if ended == "end":
                return
            if not stream.connections:  # still opening: a refusal here is no restart
                await asyncio.sleep(random.uniform(0.1, 0.5))
                continue
            stream.eof += ended == "eof"
            if stream.k_at_drain is None and ended in ("drained", "eof"):
                stream.k_at_drain = stream.ks[-1] if stream.ks else 0
            if ended == "gap":
                continue
            if self.plan.reconnect == "hint":
                # EventSource: wait the last `retry:` given, and again after each refusal.
                await asyncio.sleep(stream.retry_ms / 1000)
            elif not self.restarted.is_set():
                await self.restarted.wait()
            elif ended in ("refused", "http"):
                await asyncio.sleep(random.uniform(0.1, 0.5))

    def wait_for(self, targets: list[int]) -> None:
        """Arms the count of streams still short of their call's target turn."""
        self.targets = targets
        self.remaining = 0
        self.all_reached.clear()
        for stream in self.streams:
            stream.waiting = not any(k >= targets[stream.call] for k in stream.ks)
            self.remaining += stream.waiting
        if self.remaining == 0:
            self.all_reached.set()

    def report(self, finals: list[int], restart_targets: list[int]) -> dict[str, Any]:
        totals: dict[str, Any] = {
            "lost": 0,
            "lost_holes": 0,
            "duplicated": 0,
            "out_of_order": 0,
            "unexpected": 0,
            "wrong_call": 0,
            "id_regressions": 0,
            "streams_with_loss": 0,
            "incomplete_connected": 0,
            "streams_with_duplicates": 0,
            "resumes": 0,
            "from_start": 0,
            "drained": 0,
            "gaps": 0,
            "resets": 0,
            "connect_errors": 0,
            "eof": 0,
            "http_errors": {},
            "other_events": {},
            "frames": 0,
            "catch_up": [],
            "reconnect": [],
            "missed": [],
            "not_caught_up": 0,
        }
        for s in self.streams:
            expected = finals[s.call]
            received = list(s.ks)
            distinct = set(received)
            lost = sum(1 for k in range(1, expected + 1) if k not in distinct)
            duplicated = len(received) - len(distinct)
            # A hole (a turn missing below one received) is lost for good: the cursor has moved
            # past it. A missing tail may still be on its way when the run ends.
            top = max(distinct, default=0)
            totals["lost_holes"] += sum(1 for k in range(1, top) if k not in distinct)
            totals["lost"] += lost
            totals["duplicated"] += duplicated
            totals["streams_with_loss"] += lost > 0
            totals["incomplete_connected"] += lost > 0 and s.connected
            totals["streams_with_duplicates"] += duplicated > 0
            totals["out_of_order"] += sum(1 for a, b in itertools.pairwise(received) if b < a)
            totals["unexpected"] += sum(1 for k in distinct if not 1 <= k <= expected)
            totals["frames"] += len(received)
            for name in ("wrong_call", "id_regressions", "resumes", "from_start", "drained"):
                totals[name] += getattr(s, name)
            for name in ("gaps", "resets", "connect_errors", "eof"):
                totals[name] += getattr(s, name)
            for name in ("http_errors", "other_events"):
                for key, count in getattr(s, name).items():
                    totals[name][str(key)] = totals[name].get(str(key), 0) + count
            # Caught up: the first frame at or past the last final published before the
            # replica listened again.
            target = restart_targets[s.call]
            at = next((t for k, t in zip(s.ks, s.times, strict=True) if k >= target), None)
            if at is None:
                totals["not_caught_up"] += 1
            else:
                totals["catch_up"].append(max(0.0, at - self.t0))
            if s.resumed_at is not None:
                totals["reconnect"].append(s.resumed_at - self.t0)
            if s.k_at_drain is not None:
                totals["missed"].append(restart_targets[s.call] - s.k_at_drain)
        return totals


def worker(plan: Plan, conn: Connection) -> None:
    import uvloop

    async def main() -> None:
        state = Worker(plan)
        tasks = []
        for stream in state.streams:
            tasks.append(asyncio.create_task(state.client(stream)))
            if len(tasks) % 200 == 0:
                await asyncio.sleep(0)  # let the handshakes breathe
        deadline = time.monotonic() + 300
        while state.opened < len(state.streams):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {state.opened} of {len(state.streams)} streams opened")
            await asyncio.sleep(0.05)
        conn.send(("open", state.opened))
        loop = asyncio.get_running_loop()
        process = psutil.Process()
        cpu_at_go = 0.0
        while True:
            command, *args = await loop.run_in_executor(None, conn.recv)
            if command == "go":
                state.t0 = args[0]
                cpu_at_go = sum(process.cpu_times()[:2])
                state.restarted.set()
                conn.send(("went",))
            elif command == "wait":
                targets, timeout = args
                state.wait_for(targets)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.all_reached.wait(), timeout)
                busy = sum(process.cpu_times()[:2]) - cpu_at_go
                conn.send(("waited", state.remaining, busy))
            elif command == "report":
                conn.send(("report", state.report(*args)))
            elif command == "stop":
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                return

    uvloop.run(main())


# --- the driver -------------------------------------------------------------------------------


class Publisher:
    """Publishes final turns round-robin over the calls, `rate` per call per second, each
    numbered per call from 1 (`k=`) and naming its call (`c=`), until stopped."""

    def __init__(self, nats_url: str, workspace_id: str, calls: list[str], rate: float) -> None:
        self.nats_url = nats_url
        self.workspace_id = workspace_id
        self.calls = calls
        self.rate = rate
        self.counts = [0] * len(calls)
        self.published = asyncio.Event()  # set after each final
        self.stopping = False
        self.started = 0.0
        self.elapsed = 0.0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    async def run(self) -> None:
        client = await nats.connect(self.nats_url)
        producer = Producer(client)
        step = 1.0 / self.rate / len(self.calls)
        self.started = time.monotonic()
        tick = 0
        try:
            while not self.stopping:
                call = tick % len(self.calls)
                k = self.counts[call] + 1
                await producer.turn(
                    self.workspace_id,
                    self.calls[call],
                    role=("user", "agent")[k % 2],
                    text=f"k={k} c={call} {FILLER}",
                    is_final=True,
                    turn_id=producer.new_turn_id(),
                )
                self.counts[call] = k
                self.published.set()
                tick += 1
                delay = self.started + tick * step - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await client.flush()
        finally:
            self.elapsed = time.monotonic() - self.started
            await client.close()

    async def stop(self) -> None:
        self.stopping = True
        assert self.task is not None
        await self.task

    def per_call(self) -> int:
        return min(self.counts)

    async def until(self, per_call: int) -> None:
        """Returns once every call has had `per_call` finals."""
        while self.per_call() < per_call:
            self.published.clear()
            await self.published.wait()


@dataclass
class Replica:
    process: asyncio.subprocess.Process
    url: str
    started_in: float
    reader: asyncio.Task[None] | None = None
    stats: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.stats = psutil.Process(self.process.pid)

    def cpu(self) -> float:
        """CPU seconds of the serve: its supervisor, gateways and consumers."""
        return tree_cpu(self.stats)

    def rss(self) -> int:
        total = 0
        for process in tree(self.stats):
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        return total


def _die_with_us() -> None:
    """In the child before exec: SIGTERM it if the benchmark dies, however it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


async def launch(scratch: Path, port: int, env: dict[str, str], replicas: list[Replica]) -> Replica:
    """Starts `switchboard serve` and returns once its banner says it listens; `replicas`
    keeps it, so that a failed run stops it too."""
    started = time.monotonic()
    log = (scratch / "server.log").open("ab")
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "switchboard", "serve", "--port", str(port)),
            *("--data-dir", str(scratch / "serve")),
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env=env,
            preexec_fn=_die_with_us,
        )
    finally:
        log.close()
    replicas.append(Replica(process, "", 0.0))
    assert process.stdout is not None
    url = ""
    while True:
        line = (await asyncio.wait_for(process.stdout.readline(), 120)).decode()
        if not line:
            tail = (scratch / "server.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"serve exited during its start; its log ends:\n{tail}")
        if match := re.search(r"URL:\s+(\S+)", line):
            url = match.group(1)
        if line.startswith("  Try:"):
            break
    replica = replicas[-1]
    replica.url, replica.started_in = url, time.monotonic() - started
    replica.reader = asyncio.create_task(_discard(process.stdout))  # never let its pipe fill
    return replica


async def _discard(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


async def stop(replica: Replica, patience: float = 60.0) -> float | str:
    """SIGTERM, as an orchestrator stops a replica; returns the seconds it took to exit."""
    began = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        replica.process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(replica.process.wait(), patience)
    except TimeoutError:
        replica.process.kill()
        await replica.process.wait()
        return "killed"
    return round(time.monotonic() - began, 2)


async def ask(pipes: list[Connection], message: tuple[Any, ...], patience: float) -> list[Any]:
    """Sends `message` to every worker and returns their answers."""
    loop = asyncio.get_running_loop()
    for pipe in pipes:
        pipe.send(message)
    answers = []
    for pipe in pipes:
        if not await loop.run_in_executor(None, pipe.poll, patience):
            raise RuntimeError(f"a client worker did not answer {message[0]!r}")
        answers.append(pipe.recv())
    return answers


async def sample_rss(replica: Replica, peak: list[int], done: asyncio.Event) -> None:
    while not done.is_set():
        with contextlib.suppress(psutil.Error):
            peak[0] = max(peak[0], replica.rss())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="switchboard-storm-") as folder:
        scratch = Path(folder)
        postgres = EmbeddedPostgres(scratch / "postgres")
        bus = EmbeddedNats(scratch / "nats")
        try:
            database_url = postgres.start()
            nats_url = bus.start()
            return asyncio.run(_run(args, scratch, database_url, nats_url, postgres, bus))
        finally:
            bus.stop()
            postgres.stop()


@dataclass
class Setup:
    """What the run's steps share: the flags, where things are, and what is measured."""

    args: argparse.Namespace
    scratch: Path
    env: dict[str, str]  # serve's environment
    port: int  # serve's, the same after the restart
    nats_url: str
    postgres: psutil.Process
    nats: psutil.Process
    nats_log: Path
    replicas: list[Replica] = field(default_factory=list)


async def _run(
    args: argparse.Namespace,
    scratch: Path,
    database_url: str,
    nats_url: str,
    postgres: EmbeddedPostgres,
    bus: EmbeddedNats,
) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env |= {
        "SWITCHBOARD_DATABASE_URL": database_url,
        "SWITCHBOARD_NATS_URL": nats_url,
        "SWITCHBOARD_LOG_LEVEL": "warning",
        # SPEC 6 caps a workspace at 1,000 streams; this benchmark puts every stream in one
        # workspace and reconnects them all at once, so it lifts the caps (the streams, the
        # minute, and the burst that paces it) rather than measure a refusal.
        "SWITCHBOARD_WORKSPACE_MAX_STREAMS": str(args.streams * 2),
        "SWITCHBOARD_WORKSPACE_RATE_PER_MINUTE": str(max(20000, args.streams * 20)),
        "SWITCHBOARD_WORKSPACE_BURST_SECONDS": "60",
    }
    if args.drain_seconds is not None:
        env["SWITCHBOARD_DRAIN_SECONDS"] = str(args.drain_seconds)
    assert postgres.process is not None and bus.process is not None
    setup = Setup(
        args,
        scratch,
        env,
        free_port(),
        nats_url,
        psutil.Process(postgres.process.pid),
        psutil.Process(bus.process.pid),
        bus.log_path,
    )
    try:
        return await _with_clients(setup)
    finally:
        for replica in setup.replicas:  # after a failure: nothing of ours outlives the run
            if replica.process.returncode is None:
                replica.process.kill()
                await replica.process.wait()


async def _with_clients(setup: Setup) -> dict[str, Any]:
    args = setup.args
    replica = await launch(setup.scratch, setup.port, setup.env, setup.replicas)
    created = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "switchboard", "workspace", "create", "resume-storm", "--json"),
        stdout=asyncio.subprocess.PIPE,
        env=setup.env,
    )
    out, _ = await created.communicate()
    if created.returncode != 0:
        raise RuntimeError("switchboard workspace create failed")
    workspace = orjson.loads(out)
    key, workspace_id = workspace["api_key"], workspace["workspace_id"]
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=replica.url, headers=headers, timeout=30) as http:
        calls = []
        for _ in range(args.calls):
            placed = await http.post(
                "/v1/calls", json={"to_number": "+14155550100", "from_number": "+14155550101"}
            )
            placed.raise_for_status()
            calls.append(placed.json()["id"])

    # N streams, N/C per call, spread over the client workers.
    streams = [(n % args.calls, calls[n % args.calls]) for n in range(args.streams)]
    ctx = mp.get_context("spawn")
    pipes: list[Connection] = []
    procs = []
    for w in range(args.workers):
        parent, child = ctx.Pipe()
        plan = Plan(replica.url, key, streams[w :: args.workers], args.reconnect)
        proc = ctx.Process(target=worker, args=(plan, child), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    loop = asyncio.get_running_loop()
    try:
        for pipe in pipes:
            if not await loop.run_in_executor(None, pipe.poll, 330):
                raise RuntimeError("a client worker did not open its streams (see its traceback)")
        opened = sum(pipe.recv()[1] for pipe in pipes)
        return await _storm(setup, pipes, opened, calls, workspace_id, key)
    finally:
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for proc in procs:
            await loop.run_in_executor(None, proc.join, 30)
            if proc.is_alive():
                proc.kill()


async def _storm(
    setup: Setup,
    pipes: list[Connection],
    opened: int,
    calls: list[str],
    workspace_id: str,
    key: str,
) -> dict[str, Any]:
    args = setup.args
    replica = setup.replicas[-1]
    first_start = replica.started_in
    publisher = Publisher(setup.nats_url, workspace_id, calls, args.rate)
    publisher.start()
    await asyncio.sleep(args.warmup)
    # Every stream has had its live frames (one cursor each) before the replica goes away.
    warm = [publisher.per_call()] * len(calls)
    waited = await ask(pipes, ("wait", warm, 30.0), 60)
    if any(answer[1] for answer in waited):
        raise RuntimeError("streams did not receive the live finals before the restart")
    rss_steady = replica.rss()

    # The replica goes away (drained), finals keep coming, and it comes back on the same port.
    stopped_in = await stop(replica)
    at_exit = publisher.per_call()
    # Come back when about `missed` finals per call have been stored since the exit, allowing
    # for the start itself (finals keep coming while the new replica boots).
    launch_at = at_exit + max(0, round(args.missed - args.rate * first_start))
    await publisher.until(launch_at)
    replica = await launch(setup.scratch, setup.port, setup.env, setup.replicas)
    t0 = time.time()
    restart_targets = list(publisher.counts)
    cpu0 = replica.cpu()
    pg0, nats0 = tree_cpu(setup.postgres), tree_cpu(setup.nats)
    box0 = psutil.cpu_times()
    peak = [replica.rss()]
    done = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(replica, peak, done))
    await ask(pipes, ("go", t0), 10)

    # Until every stream has every final published before the replica listened again (or the
    # timeout): the window over which the servers' CPU and memory are measured.
    answers = await ask(pipes, ("wait", restart_targets, args.timeout), args.timeout + 30)
    window = time.time() - t0
    cpu_storm = replica.cpu() - cpu0
    pg_storm, nats_storm = tree_cpu(setup.postgres) - pg0, tree_cpu(setup.nats) - nats0
    box1 = psutil.cpu_times()
    box_total = sum(box1) - sum(box0)
    box_idle = box1.idle + box1.iowait - box0.idle - box0.iowait
    box_busy_cores = (box_total - box_idle) / max(box_total, 1e-9) * (os.cpu_count() or 1)
    done.set()
    await sampler
    load = os.getloadavg()
    behind_at_timeout = sum(answer[1] for answer in answers)
    client_cpu = [answer[2] for answer in answers]

    # Live frames keep flowing for a while after the storm, then every stream must have all.
    remaining = args.after - (time.time() - t0)
    if remaining > 0:
        await asyncio.sleep(remaining)
    await publisher.stop()
    finals = list(publisher.counts)
    settled = await ask(pipes, ("wait", finals, 60.0), 90)
    incomplete = sum(answer[1] for answer in settled)
    reports = [a[1] for a in await ask(pipes, ("report", finals, restart_targets), 120)]
    async with httpx.AsyncClient(
        base_url=replica.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as http:
        metrics = (await http.get("/metrics")).text
    for pipe in pipes:  # the clients go first, so the last stop drains nothing
        pipe.send(("stop",))
    await asyncio.sleep(0.5)
    await stop(replica)

    total: dict[str, Any] = {}
    for report in reports:
        for name, value in report.items():
            if isinstance(value, list):
                total.setdefault(name, []).extend(value)
            elif isinstance(value, dict):
                merged = total.setdefault(name, {})
                for k, v in value.items():
                    merged[k] = merged.get(k, 0) + v
            else:
                total[name] = total.get(name, 0) + value
    catch_up, reconnect, missed = total["catch_up"], total["reconnect"], total["missed"]

    def ms(values: list[float], q: float) -> float:
        return round(percentile(values, q) * 1000) if values else float("nan")

    return {
        "streams": opened,
        "calls": len(calls),
        "reconnect": args.reconnect,
        "rate_per_call": args.rate,
        "publish_rate_achieved": round(sum(finals) / max(publisher.elapsed, 1e-9), 1),
        "finals_per_call": finals[0] if len(set(finals)) == 1 else [min(finals), max(finals)],
        "first_start_seconds": round(first_start, 2),
        "stop_seconds": stopped_in,
        "restart_seconds": round(replica.started_in, 2),
        "missed_per_stream_min_p50_max": [
            min(missed, default=0),
            round(percentile(missed, 0.5)) if missed else 0,
            max(missed, default=0),
        ],
        # From the moment the new replica listened until the last stream had every final
        # published before that moment (None: some never did).
        "all_caught_up_seconds": (
            round(max(catch_up), 2) if catch_up and not total["not_caught_up"] else None
        ),
        "streams_not_caught_up": total["not_caught_up"],
        "streams_behind_at_timeout": behind_at_timeout,
        "catch_up_ms_p50": ms(catch_up, 0.5),
        "catch_up_ms_p99": ms(catch_up, 0.99),
        "catch_up_ms_max": ms(catch_up, 1.0),
        # From the moment the replica listened to each resumed stream's `200` (its response
        # starts once the server has found the cursor, before the replay).
        "reconnect_ms_p50": ms(reconnect, 0.5),
        "reconnect_ms_p99": ms(reconnect, 0.99),
        "frames_received": total["frames"],
        "frames_expected": sum(finals[n % len(calls)] for n in range(opened)),
        "lost": total["lost"],
        "lost_holes": total["lost_holes"],
        "duplicated": total["duplicated"],
        "out_of_order": total["out_of_order"],
        "unexpected_frames": total["unexpected"] + total["wrong_call"],
        # Frames whose `id:` was missing or not later than the one before.
        "cursor_regressions": total["id_regressions"],
        "streams_incomplete_at_end": incomplete,
        # Of those, how many had a response open (reading, or waiting for its replay).
        "streams_incomplete_connected": total["incomplete_connected"],
        "client_resumes_with_cursor": total["resumes"],
        "client_resumes_from_start": total["from_start"],
        "client_drained": total["drained"],
        "client_cut_without_terminal": total["eof"],
        "client_gaps": total["gaps"],
        "client_resets": total["resets"],
        "client_connect_errors": total["connect_errors"],
        "client_http_errors": total["http_errors"],
        "client_other_events": total["other_events"],
        "server_resumes": int(
            metric(metrics, f"switchboard_stream_resumes_total{{{STREAM_KIND}}}")
        ),
        "server_frames_replayed": int(
            metric(metrics, f"switchboard_frames_replayed_total{{{STREAM_KIND}}}")
        ),
        "server_frames_dropped": int(metric(metrics, "switchboard_frames_dropped_total")),
        "server_gaps": int(metric(metrics, "switchboard_stream_gaps_total")),
        "server_resets": int(metric(metrics, "switchboard_stream_resets_total")),
        # Over the storm: from the moment the new replica listened until all had caught up
        # (or the timeout).
        "storm_window_seconds": round(window, 2),
        "storm_server_cpu_seconds": round(cpu_storm, 2),
        "storm_server_core_share": round(cpu_storm / max(window, 1e-9), 2),
        "storm_server_rss_peak_mib": round(peak[0] / 2**20, 1),
        "steady_server_rss_mib_before_restart": round(rss_steady / 2**20, 1),
        "storm_nats_cpu_seconds": round(nats_storm, 2),
        "storm_postgres_cpu_seconds": round(pg_storm, 2),
        "storm_client_worker_core_share": [round(c / max(window, 1e-9), 2) for c in client_cpu],
        # Everything on the machine over the storm, in cores busy (out of os.cpu_count()).
        "storm_machine_busy_cores": round(box_busy_cores, 2),
        "load_average": [round(v, 2) for v in load],
        "server_log": log_summary(setup.scratch / "server.log", args.server_log),
        "nats_log": log_summary(setup.nats_log, None, NATS_WARNINGS),
        "commit": commit(),
        "machine": machine(),
    }


SERVE_WARNINGS = r"\b(WARNING|ERROR|CRITICAL)\b|Traceback"
NATS_WARNINGS = r"\[(WRN|ERR|FTL)\]"


def log_summary(path: Path, keep: str | None, pattern: str = SERVE_WARNINGS) -> dict[str, Any]:
    """What a server logged at warning and above, counted by kind of message (numbers made
    `N`); a copy is kept at `keep` when given."""
    text = path.read_text(errors="replace") if path.exists() else ""
    if keep:
        Path(keep).write_text(text)
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if re.search(pattern, line):
            message = re.sub(r"\d+", "N", line)[:160]  # one entry per kind of message
            counts[message] = counts.get(message, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return {"warnings_and_errors": sum(counts.values()), "top": dict(ranked[:8])}


def commit() -> str:
    """The commit the server ran, and whether its code differed from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "switchboard"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return head + (" (switchboard/ modified)" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--calls", type=int, default=None, help="default: streams / 100")
    parser.add_argument("--rate", type=float, default=2.0, help="finals per call per second")
    parser.add_argument("--missed", type=int, default=50, help="finals per call while down")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds live before stop")
    parser.add_argument(
        "--after", type=float, default=10.0, help="seconds of live finals after the restart"
    )
    parser.add_argument("--reconnect", choices=["storm", "hint"], default="storm")
    parser.add_argument(
        "--drain-seconds", type=float, default=None, help="SWITCHBOARD_DRAIN_SECONDS for serve"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to catch up")
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--server-log", default=None, help="keep serve's log at this path")
    args = parser.parse_args()
    if args.calls is None:
        args.calls = max(1, args.streams // 100)
    result = run(args)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
