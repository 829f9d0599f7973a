"""Test fixtures for the production topology on one machine: a three-node NATS cluster with
JetStream (three `nats-server` processes from the wheel, clustered on 127.0.0.1) and Switchboard
replicas as real `switchboard serve` processes, so that kill -9 is real.

Each NATS node has its own store, its own ports (kept across a restart, so clients that were
given the cluster's URLs find it again) and the cluster's client token, as `EmbeddedNats` has;
routes between nodes carry their own credentials. Nodes and replicas die with the test process
(parent-death signal), even if it is killed itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import nats
import psutil
from nats.aio.client import Client
from nats.js.api import StreamInfo

from switchboard.bus.connection import Bus
from switchboard.embedded import (
    ChildProcess,
    _die_with_parent,
    _spawn,
    free_port,
    nats_server_binary,
    private_directory,
)
from tests.harness import eventually

CLUSTER_NAME = "switchboard-test"


@dataclass
class NatsNode:
    """One `nats-server` of the cluster: its name, store and ports stay the same for its life."""

    name: str
    root: Path
    client_port: int
    cluster_port: int
    monitor_port: int
    process: ChildProcess | None = None

    @property
    def log_path(self) -> Path:
        return self.root / "nats.log"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def monitor(self, endpoint: str, **params: Any) -> dict[str, Any]:
        """One monitoring endpoint of this node (`jsz`, `connz`, `routez`, ...)."""
        response = httpx.get(
            f"http://127.0.0.1:{self.monitor_port}/{endpoint}", params=params, timeout=2
        )
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


@dataclass
class NatsCluster:
    """Three (or `size`) clustered NATS servers with JetStream, token auth, on 127.0.0.1."""

    root: Path
    size: int = 3
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    route_password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    nodes: list[NatsNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        private_directory(self.root)
        self.nodes = [
            NatsNode(f"n{i + 1}", self.root / f"n{i + 1}", free_port(), free_port(), free_port())
            for i in range(self.size)
        ]

    # --- URLs --------------------------------------------------------------------------------

    def node_url(self, node: NatsNode) -> str:
        return f"nats://{quote(self.token, safe='')}@127.0.0.1:{node.client_port}"

    @property
    def urls(self) -> list[str]:
        """Every node's client URL, each with the token (what nats-py's `servers=` takes)."""
        return [self.node_url(node) for node in self.nodes]

    @property
    def url(self) -> str:
        """The cluster as one comma-separated SWITCHBOARD_NATS_URL."""
        return ",".join(self.urls)

    def node(self, name: str) -> NatsNode:
        return next(node for node in self.nodes if node.name == name)

    def node_on_port(self, port: int) -> NatsNode:
        return next(node for node in self.nodes if node.client_port == port)

    # --- processes ---------------------------------------------------------------------------

    def _config(self, node: NatsNode) -> str:
        user = "route"
        routes = ", ".join(
            json.dumps(f"nats-route://{user}:{self.route_password}@127.0.0.1:{peer.cluster_port}")
            for peer in self.nodes
            if peer is not node
        )
        return "\n".join(
            [
                f"server_name: {node.name}",
                f"listen: 127.0.0.1:{node.client_port}",
                f"http: 127.0.0.1:{node.monitor_port}",
                "max_payload: 1MB",
                f"authorization {{ token: {json.dumps(self.token)} }}",
                "jetstream {",
                f"  store_dir: {json.dumps(str(node.root / 'jetstream'))}",
                "  max_memory_store: 64MB",
                "  max_file_store: 1GB",
                "}",
                "cluster {",
                f"  name: {CLUSTER_NAME}",
                f"  listen: 127.0.0.1:{node.cluster_port}",
                f"  authorization {{ user: {user}, password: {json.dumps(self.route_password)} }}",
                f"  routes: [{routes}]",
                "}",
            ]
        )

    def spawn(self, node: NatsNode) -> None:
        """Starts (or restarts) one node on its own ports and store; does not wait."""
        assert not node.alive, f"{node.name} is already running"
        private_directory(node.root)
        config = node.root / "nats.conf"
        config.write_text(self._config(node))
        config.chmod(0o600)
        argv = [str(nats_server_binary()), "-c", str(config)]
        node.process = _spawn(f"nats-server {node.name}", argv, node.log_path, signal.SIGTERM)

    async def start(self, within: float = 30.0) -> None:
        """Starts every node and returns once JetStream has a meta leader that all of them
        follow."""
        for node in self.nodes:
            self.spawn(node)
        await self.wait_until_formed(within)

    def kill(self, node: NatsNode) -> None:
        """kill -9: no goodbye to clients or peers, nothing flushed."""
        assert node.process is not None, f"{node.name} is not running"
        node.process.popen.send_signal(signal.SIGKILL)
        node.process.popen.wait(10)
        node.process = None

    async def restart(self, node: NatsNode, within: float = 30.0) -> None:
        """Brings a killed node back on its ports and store, and waits until it has rejoined."""
        self.spawn(node)
        await self.wait_until_formed(within)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None:
                node.process.stop()
                node.process = None

    # --- state -------------------------------------------------------------------------------

    def _check_alive(self) -> None:
        for node in self.nodes:
            if node.process is not None and not node.process.alive():
                tail = node.log_path.read_text(errors="replace")[-2000:]
                raise AssertionError(f"nats-server {node.name} exited; its log ends:\n{tail}")

    def meta_leader(self) -> str | None:
        """The JetStream meta leader that every running node follows, once the leader sees
        every running peer current; None while the cluster is still forming."""
        self._check_alive()
        running = [node for node in self.nodes if node.alive]
        metas: dict[str, dict[str, Any]] = {}
        for node in running:
            try:
                metas[node.name] = node.monitor("jsz").get("meta_cluster") or {}
            except httpx.HTTPError:
                return None
        leaders = {meta.get("leader") for meta in metas.values()}
        if len(leaders) != 1:
            return None
        leader = leaders.pop()
        if leader not in metas or metas[leader].get("cluster_size") != self.size:
            return None
        # Followers do not track each other; the leader knows who is current.
        current = {
            peer["name"]
            for peer in metas[leader].get("replicas") or []
            if peer.get("current") and not peer.get("offline")
        }
        if not {node.name for node in running if node.name != leader} <= current:
            return None
        return str(leader)

    async def wait_until_formed(self, within: float = 30.0) -> str:
        leader: str = await eventually(lambda: asyncio.to_thread(self.meta_leader), within=within)
        return leader

    async def connect(self, **options: Any) -> Client:
        """A client of the cluster (every node in its server list), as a producer would be."""
        return await nats.connect(
            servers=self.urls,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            connect_timeout=2,
            **options,
        )

    async def create_streams(self, replicas: int = 3) -> list[StreamInfo]:
        """Creates Switchboard's JetStream streams, replicated `replicas` times, exactly as
        `Bus.ensure_streams` configures them, so that replicas find them as they are."""
        client = await self.connect()
        try:
            bus = Bus(client, replicas=replicas)
            made = [await bus.js.add_stream(config) for config in bus.stream_configs()]
            for info in made:
                await self.wait_stream_current(client, info.config.name or "", replicas)
            return made
        finally:
            await client.close()

    async def wait_stream_current(
        self, client: Client, stream: str, replicas: int = 3, within: float = 30.0
    ) -> StreamInfo:
        """Waits until `stream` has a leader and all its followers are current."""
        js = client.jetstream()

        async def current() -> StreamInfo | None:
            try:
                info = await js.stream_info(stream)
            except Exception:  # an election in progress answers with an error or not at all
                return None
            cluster = info.cluster
            if cluster is None or cluster.leader is None:
                return None
            followers = cluster.replicas or []
            if len(followers) != replicas - 1:
                return None
            return info if all(peer.current and not peer.offline for peer in followers) else None

        info: StreamInfo = await eventually(current, within=within)
        return info

    async def move_stream_leader(self, client: Client, stream: str, to: NatsNode) -> None:
        """Makes `to` the leader of `stream` (a step-down with a preferred successor)."""
        js = client.jetstream()
        info = await self.wait_stream_current(client, stream)
        if info.cluster is not None and info.cluster.leader == to.name:
            return
        answer = await client.request(
            f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}",
            json.dumps({"placement": {"preferred": to.name}}).encode(),
            timeout=5,
        )
        body = json.loads(answer.data)
        assert body.get("success"), body

        async def moved() -> bool:
            try:
                found = await js.stream_info(stream)
            except Exception:
                return False
            return found.cluster is not None and found.cluster.leader == to.name

        await eventually(moved, within=15)
        await self.wait_stream_current(client, stream)

    def nodes_used_by(self, pid: int) -> list[NatsNode]:
        """The nodes a process holds client connections to (seen from its sockets)."""
        ports = {node.client_port for node in self.nodes}
        found = {
            conn.raddr.port
            for conn in psutil.Process(pid).net_connections(kind="tcp")
            if conn.raddr
            and conn.raddr.ip == "127.0.0.1"
            and conn.raddr.port in ports
            and conn.status == psutil.CONN_ESTABLISHED
        }
        return [self.node_on_port(port) for port in sorted(found)]


# --- Switchboard replicas -----------------------------------------------------------------------


def replica_env(database_url: str, nats_url: str, **settings: str) -> dict[str, str]:
    """The environment of a replica: the external Postgres and NATS, and `settings` as
    SWITCHBOARD_<NAME> (nothing inherited from the test's own SWITCHBOARD_* variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["SWITCHBOARD_DATABASE_URL"] = database_url
    env["SWITCHBOARD_NATS_URL"] = nats_url
    for name, value in settings.items():
        env[f"SWITCHBOARD_{name.upper()}"] = value
    return env


@dataclass
class Replica:
    """One `switchboard serve` process on 127.0.0.1:<free port>."""

    name: str
    process: subprocess.Popen[str]
    url: str = ""
    output: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The gateway process: the one of the serve's processes that listens on its port (a
        serve is a supervisor, its gateway worker and its consumers' process)."""
        port = int(self.url.rsplit(":", 1)[1])
        for process in self._tree():
            with contextlib.suppress(psutil.Error):
                for conn in process.net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                        return process.pid
        raise AssertionError(f"no process of replica {self.name} listens on {self.url}")

    def _tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def pause(self) -> None:
        """SIGSTOP to every process of the serve: nothing reads or reconnects until `resume`."""
        for process in self._tree():
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process.poll() is None:
            for process in self._tree():
                with contextlib.suppress(psutil.Error):
                    process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """kill -9 of every process of the serve (its own session): its clients' connections
        are cut without a close frame or a terminal."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log(self) -> str:
        return "".join(self.output)


def start_replica(name: str, env: dict[str, str], cwd: Path, timeout: float = 60.0) -> Replica:
    """Starts `switchboard serve --port 0` in `cwd` and returns once its banner names its
    URL."""
    process = subprocess.Popen(
        # One gateway process, so that "the NATS node its replica uses" is one node.
        [
            *(sys.executable, "-m", "switchboard", "serve", "--port", "0"),
            *("--host", "127.0.0.1", "--workers", "1"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=_die_with_parent(signal.SIGKILL),
    )
    replica = Replica(name, process)
    assert process.stdout is not None
    stdout = process.stdout
    found = threading.Event()

    def read() -> None:
        for line in iter(stdout.readline, ""):
            replica.output.append(line)
            if not replica.url and (match := re.search(r"URL:\s+(http://\S+)", line)):
                replica.url = match.group(1)
                found.set()
        found.set()  # the process ended: stop waiting

    threading.Thread(target=read, name=f"replica {name} output", daemon=True).start()
    if not found.wait(timeout) or not replica.url:
        replica.stop()
        raise AssertionError(f"replica {name} did not start:\n{replica.log()}")
    return replica
