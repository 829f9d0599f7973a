"""One `serve`, several processes (issue 13): `--workers N` gateway processes share the port
through SO_REUSEPORT (the kernel spreads connections across them), each with its own hub,
stream registry and limits book, like replicas on one machine; the durable consumers
(`--role recorder`, `--role webhooks`, and the demo simulator) run in a process of their own, so
their database work never runs on a loop that is writing to streams. `--role` picks what this
`serve` runs at all, so a deployment can place each role on its own machines.

The supervisor (the process `serve` started in) owns the embedded Postgres and NATS, takes the
port before anything starts, prints the banner once every process is up, forwards a stop to
every process (each drains its own streams), and restarts a process that dies unexpectedly."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from switchboard.config import Settings

if TYPE_CHECKING:
    from switchboard.api.affinity import Handoffs
    from switchboard.api.deps import Services

log = logging.getLogger(__name__)

API = "api"
RECORDER = "recorder"
WEBHOOKS = "webhooks"
ROLES = (API, RECORDER, WEBHOOKS)
CONSUMER_ROLES = frozenset({RECORDER, WEBHOOKS})

READY_TIMEOUT = 120.0  # seconds for every process to start (migrations, a cold JetStream)
# A process that dies before it is ready is not restarted: it would only die again (bad
# configuration, a port it cannot bind); the whole `serve` stops instead. One that dies after
# is, unless processes keep dying: more than RESTART_LIMIT restarts within RESTART_WINDOW
# seconds stop the serve too (a crash loop helps no client).
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15  # the process's name as `ps`, `top` and psutil show it (15 bytes at most)


@dataclass(frozen=True)
class ProcessPlan:
    name: str
    roles: frozenset[str]


def plan_processes(workers: int, roles: Iterable[str]) -> list[ProcessPlan]:
    """Which processes a `serve` runs: `workers` gateway processes for the api role, and one
    more for the consumer roles it runs."""
    chosen = frozenset(roles)
    unknown = chosen - set(ROLES)
    if unknown:
        raise ValueError(f"unknown role {sorted(unknown)[0]!r}: roles are {', '.join(ROLES)}")
    if not chosen:
        raise ValueError("choose at least one role")
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    plans = []
    if API in chosen:
        plans = [ProcessPlan(f"api-{i + 1}", frozenset({API})) for i in range(workers)]
    if chosen & CONSUMER_ROLES:
        plans.append(ProcessPlan("consumers", chosen & CONSUMER_ROLES))
    return plans


def process_name(plan: ProcessPlan) -> str:
    return f"sb-{plan.name}"


def simulator_home(plans: Sequence[ProcessPlan]) -> ProcessPlan:
    """Where `--demo`'s simulator runs: beside the consumers, else in the first gateway."""
    return next((p for p in plans if API not in p.roles), plans[0])


async def start_consumers(
    services: Services, roles: frozenset[str], demo_workspace: str | None
) -> None:
    """Starts this process's durable consumers (and the simulator), each stopped with the
    services, newest first."""
    from switchboard.recorder.consumer import Recorder
    from switchboard.simulate import SimulationPlan, Simulator
    from switchboard.webhooks.router import WebhookRouter
    from switchboard.webhooks.sender import Sender

    if RECORDER in roles:
        recorder = Recorder(services.database, services.bus, metrics=services.metrics)
        await recorder.start()
        services.stoppers.append(recorder.stop)
    if WEBHOOKS in roles:
        router = WebhookRouter(services.database, services.bus, metrics=services.metrics)
        await router.start()
        services.stoppers.append(router.stop)
        allow_private = services.settings.webhook_allow_private
        sender = Sender(services.database, allow_private=allow_private)
        await sender.start()
        services.stoppers.append(sender.stop)
    if demo_workspace is not None:
        simulator = Simulator(services.bus.client, SimulationPlan.demo(demo_workspace))
        await simulator.start()
        services.stoppers.append(simulator.stop)


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a process needs, sent to it at spawn (so: picklable, no open resources)."""

    plan: ProcessPlan
    settings: Settings
    database_url: str
    nats_url: str
    host: str
    port: int
    demo_workspace: str | None  # the simulator runs in the process that has it
    serve_id: str = ""  # names this serve's processes to each other (summed /metrics)
    processes: int = 1  # how many processes the serve runs
    # Stream affinity (api/affinity.py): this gateway's index among `gateways`, and the
    # directory where they pass connections to each other ("": none).
    gateway_index: int = 0
    gateways: int = 1
    handoff_dir: str = ""


def open_socket(host: str, port: int, *, reuse_port: bool, listen: bool) -> socket.socket:
    """A TCP socket bound to (host, port), listening if asked; with `reuse_port`, one of a
    group the kernel spreads connections over (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def reserve_port(sock: socket.socket) -> socket.socket:
    """Turns the port `serve` checked (a plain listening socket, so a port another program
    holds was refused with a clear message) into a reservation the workers can share: a bound,
    never-listening SO_REUSEPORT socket, which the kernel gives no connection to."""
    host, port = sock.getsockname()[:2]
    sock.close()
    return open_socket(host, port, reuse_port=True, listen=False)


# --- inside a worker process ------------------------------------------------------------------


def worker_main(spec: WorkerSpec, parent: Connection) -> None:
    """A worker's entry point (spawned): serves its roles until SIGTERM or SIGINT, or until
    the supervisor is gone."""
    from switchboard.logs import configure_logging
    from switchboard.server import run

    # Ctrl-C in a terminal reaches every process of the group; the supervisor's SIGTERM too.
    # Either drains. If the supervisor is killed outright, the kernel sends SIGTERM.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # `sb-api-1`, `sb-consumers`: an operator (or a benchmark) can tell the processes of a
        # serve apart, and which one is busy, instead of seeing `python` several times.
        libc.prctl(PR_SET_NAME, process_name(spec.plan).encode()[:15], 0, 0, 0)
    # A Ctrl-C before the loop takes the signals over is the supervisor's to handle (it sends
    # SIGTERM); after, the loop's handlers make it a graceful stop here too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(spec.settings.log_format, spec.settings.log_level)
    run(serve_roles(spec, parent))


async def serve_roles(spec: WorkerSpec, parent: Connection) -> None:
    import asyncio

    from switchboard.api.app import create_app
    from switchboard.live.siblings import SiblingMetrics
    from switchboard.server import (
        GatewayServer,
        close_services,
        draining,
        open_services,
        uvicorn_config,
    )

    services = await open_services(spec.settings, spec.database_url, spec.nats_url)
    try:
        if spec.processes > 1 and spec.serve_id:
            siblings = SiblingMetrics(
                services.bus.client, services.metrics, spec.serve_id, spec.processes
            )
            await siblings.start()
            services.siblings = siblings
            services.stoppers.append(siblings.stop)
        await start_consumers(services, spec.plan.roles, spec.demo_workspace)
        loop = asyncio.get_running_loop()
        if API not in spec.plan.roles:
            stop = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            freeze_startup_objects()
            parent.send(("ready", os.getpid()))
            await stop.wait()
            return
        sock = open_socket(spec.host, spec.port, reuse_port=True, listen=True)
        handoffs = stream_handoffs(spec, services)
        server = GatewayServer(
            uvicorn_config(create_app(services), spec.settings, handoffs),
            drain=draining(services),
            handoffs=handoffs,
        )

        async def announce_when_listening() -> None:
            await server.listening.wait()
            freeze_startup_objects()
            if handoffs is not None:
                handoffs.open(server.adopt)
            parent.send(("ready", os.getpid()))

        announcing = asyncio.create_task(announce_when_listening())
        try:
            await server.serve(sockets=[sock])
        finally:
            announcing.cancel()
            sock.close()
    finally:
        await close_services(services)


def freeze_startup_objects() -> None:
    """Takes what the process made to start (modules, the app, its services: some 75,000
    objects, alive for the process's life) out of the garbage collector's full passes. Each full
    pass walked them all: 50-70 ms with the event loop stopped, every few seconds under load,
    felt by every stream and request as a stall (measured in `bench/tenants.py`'s flood).
    Objects made later are collected as before."""
    gc.collect()
    gc.freeze()


def stream_handoffs(spec: WorkerSpec, services: Services) -> Handoffs | None:
    """This gateway's end of stream affinity, when the serve runs several (api/affinity.py)."""
    from switchboard.api.affinity import Handoffs

    if spec.gateways < 2 or not spec.handoff_dir or not spec.settings.stream_affinity:
        return None
    counts = services.metrics.counter(
        "switchboard_stream_handoffs_total",
        "Stream connections by what stream affinity did with them: passed to the worker that "
        "owns their call or conversation, adopted from another worker, or kept (the owner "
        "could not take them at once).",
        "outcome",
    )
    return Handoffs(Path(spec.handoff_dir), spec.gateway_index, spec.gateways, counts)


# --- the supervisor -------------------------------------------------------------------------


class WorkersFailed(RuntimeError):
    """A process could not start, or died too soon after starting; the message says which."""


@dataclass
class _Running:
    spec: WorkerSpec
    process: BaseProcess
    channel: Connection
    started: float
    pid: int = 0


class Supervisor:
    def __init__(self, specs: Sequence[WorkerSpec], stop_timeout: float) -> None:
        self.specs = list(specs)
        self.stop_timeout = stop_timeout
        self.context = multiprocessing.get_context("spawn")
        self.running: list[_Running] = []
        self.stopping = False
        self.forced = False

    def _spawn(self, spec: WorkerSpec) -> _Running:
        ours, theirs = self.context.Pipe()
        process = self.context.Process(
            target=worker_main, args=(spec, theirs), name=f"switchboard-{spec.plan.name}"
        )
        process.start()
        theirs.close()
        return _Running(spec, process, ours, time.monotonic())

    def start(self) -> None:
        """Starts every process and returns once each is serving (WorkersFailed otherwise)."""
        self.running = [self._spawn(spec) for spec in self.specs]
        deadline = time.monotonic() + READY_TIMEOUT
        for worker in self.running:
            self._await_ready(worker, deadline)

    def _await_ready(self, worker: _Running, deadline: float) -> None:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkersFailed(f"the {worker.spec.plan.name} process did not start in time")
            if worker.channel.poll(min(left, 0.5)):
                try:
                    _, worker.pid = worker.channel.recv()
                except EOFError:
                    pass  # it died: reported below
                else:
                    return
            if not worker.process.is_alive():
                raise WorkersFailed(
                    f"the {worker.spec.plan.name} process exited with code "
                    f"{worker.process.exitcode} while starting (its log is above)"
                )

    @property
    def pids(self) -> dict[str, int]:
        return {w.spec.plan.name: w.pid for w in self.running}

    def watch(self, should_stop: Callable[[], bool]) -> None:
        """Until `should_stop()`: starts again a process that died after it was ready (one that
        dies again before it is ready, or a crash loop, ends the serve: WorkersFailed)."""
        restarts: list[float] = []
        while not should_stop():
            sentinels: list[Any] = [w.process.sentinel for w in self.running]
            if not wait(sentinels, timeout=0.5):
                continue
            for index, worker in enumerate(self.running):
                if worker.process.is_alive() or should_stop():
                    continue
                name, code = worker.spec.plan.name, worker.process.exitcode
                now = time.monotonic()
                restarts = [at for at in restarts if now - at < RESTART_WINDOW]
                if len(restarts) >= RESTART_LIMIT:
                    raise WorkersFailed(
                        f"the {name} process exited with code {code}, the "
                        f"{len(restarts) + 1}th exit within {RESTART_WINDOW:.0f} s; stopping"
                    )
                restarts.append(now)
                log.error("the %s process exited with code %s; starting it again", name, code)
                replacement = self._spawn(worker.spec)
                self._await_ready(replacement, time.monotonic() + READY_TIMEOUT)
                self.running[index] = replacement

    def force(self, signum: int = 0, frame: Any = None) -> None:
        """A second Ctrl-C (or SIGTERM) during a stop: end every process now."""
        self.forced = True

    def stop(self) -> None:
        """SIGTERM to every process (each drains its streams), then waits; kills stragglers."""
        self.stopping = True
        for worker in self.running:
            if worker.process.is_alive() and worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for worker in self.running:
            while worker.process.is_alive() and not self.forced and time.monotonic() < deadline:
                worker.process.join(0.2)
            if worker.process.is_alive():
                name = worker.spec.plan.name
                log.warning("the %s process did not stop in time; killing it", name)
                worker.process.kill()
                worker.process.join(5)
            worker.channel.close()
