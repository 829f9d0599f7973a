"""`serve --workers N` and `--role` (issue 13): gateway processes sharing one port, each serving
its own streams, with revocations and drains reaching the streams of every process; and each
role running alone, in its own `serve`, doing its own part of the work."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import psutil
import pytest

from switchboard.bus import connect_bus
from switchboard.embedded import EmbeddedNats
from switchboard.events import call_transcript_subject
from switchboard.limits.book import seconds_to_reset
from switchboard.producer import Producer
from switchboard.workers import ProcessPlan, plan_processes, simulator_home
from tests.harness import Workspace, eventually, new_workspace
from tests.receiver import Receiver

# --- which processes a serve runs (pure) --------------------------------------------------------


def test_workers_serve_the_api_and_one_more_process_runs_the_consumers() -> None:
    plans = plan_processes(2, ["api", "recorder", "webhooks"])
    assert plans == [
        ProcessPlan("api-1", frozenset({"api"})),
        ProcessPlan("api-2", frozenset({"api"})),
        ProcessPlan("consumers", frozenset({"recorder", "webhooks"})),
    ]
    assert simulator_home(plans).name == "consumers"
    assert plan_processes(3, ["recorder"]) == [ProcessPlan("consumers", frozenset({"recorder"}))]
    api_only = plan_processes(1, ["api"])
    assert api_only == [ProcessPlan("api-1", frozenset({"api"}))]
    assert simulator_home(api_only).name == "api-1"
    for bad in ((1, []), (0, ["api"]), (1, ["api", "printer"])):
        with pytest.raises(ValueError):
            plan_processes(*bad)  # type: ignore[arg-type]


# --- real serves on their own NATS and database ------------------------------------------------


@dataclass
class Serve:
    process: asyncio.subprocess.Process
    banner: str
    url: str | None

    @property
    def port(self) -> int:
        assert self.url is not None
        return int(self.url.rsplit(":", 1)[1])

    def workers(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)


@contextlib.asynccontextmanager
async def serve(
    database_url: str, nats_url: str, *args: str, data_dir: Path, **settings: str
) -> AsyncIterator[Serve]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env |= {
        "SWITCHBOARD_DATABASE_URL": database_url,
        "SWITCHBOARD_NATS_URL": nats_url,
        "SWITCHBOARD_DRAIN_SECONDS": "0.5",
        "SWITCHBOARD_WEBHOOK_ALLOW_PRIVATE": "true",
    }
    env |= {f"SWITCHBOARD_{name.upper()}": value for name, value in settings.items()}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "switchboard",
        "serve",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        *args,
        env=env,
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(90):
            while True:
                line = (await process.stdout.readline()).decode()
                assert line, f"serve exited ({process.returncode}) before it was ready"
                lines.append(line)
                if line.startswith("  Try:") or "is running:" in line:
                    break
        banner = "".join(lines)
        found = re.search(r"URL:\s+(\S+)", banner)
        yield Serve(process, banner, found.group(1) if found else None)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(60):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


@pytest.fixture
def nats_of_its_own(tmp_path: Path) -> Iterator[str]:
    # The consumers of a serve read every subject: they must not read the session's events.
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    yield server.client_url
    server.stop()


class Connection:
    """One raw keep-alive HTTP/1.1 connection to the serve: its socket's local port names the
    process that accepted it, and every request on it reaches that process."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.local_port = int(writer.get_extra_info("sockname")[1])

    @classmethod
    async def open(cls, url: str) -> Connection:
        host, port = url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    def request(self, path: str, key: str) -> None:
        """Sends a GET; the answer is read by the caller."""
        self.writer.write(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
        )

    async def get(self, path: str, key: str) -> tuple[int, dict[str, str]]:
        self.request(path, key)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode()
        status_line, *lines = head.strip().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        await self.reader.readexactly(int(headers["content-length"]))
        return int(status_line.split()[1]), headers

    async def until_closed(self) -> bytes:
        """Everything the server writes until the response ends (its last, empty chunk; the
        connection itself stays open for another request)."""
        async with asyncio.timeout(30):
            return await self.reader.readuntil(b"\r\n0\r\n\r\n")


async def open_stream(url: str, key: str) -> Connection:
    """A connection holding the workspace stream open (its 200 read)."""
    connection = await Connection.open(url)
    connection.request("/v1/events/stream", key)
    head = await connection.reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return connection


def accepted_by(serve: Serve, streams: list[Connection]) -> dict[int, int]:
    """How many of the streams each process of the serve holds (pid -> count)."""
    ours = {s.local_port for s in streams}
    counts: dict[int, int] = {}
    for worker in serve.workers():
        with contextlib.suppress(psutil.Error):
            for conn in worker.net_connections("tcp"):
                if conn.laddr.port == serve.port and conn.raddr and conn.raddr.port in ours:
                    counts[worker.pid] = counts.get(worker.pid, 0) + 1
    return counts


def listeners(serve: Serve) -> set[int]:
    """The processes of the serve that listen on its port: its gateway workers."""
    found = set()
    for worker in serve.workers():
        with contextlib.suppress(psutil.Error):
            for conn in worker.net_connections("tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == serve.port:
                    found.add(worker.pid)
    return found


STREAMS = 24  # all on one process by chance: 2 x 2^-24


@pytest.mark.slow
async def test_two_workers_share_the_port_and_revocations_and_drains_reach_both(
    own_database: str, nats_of_its_own: str, tmp_path: Path
) -> None:
    workspace = await new_workspace(own_database)
    async with serve(
        own_database, nats_of_its_own, "--workers", "2", "--role", "api", data_dir=tmp_path / "d"
    ) as running:
        assert running.url is not None
        async with httpx.AsyncClient(base_url=running.url, headers=workspace.headers) as http:
            created = (await http.post("/v1/keys", json={"name": "to revoke"})).json()
            doomed = [await open_stream(running.url, created["api_key"]) for _ in range(STREAMS)]
            holders = await eventually(lambda: accepted_by(running, doomed))
            assert len(holders) == 2, f"every stream went to one process: {holders}"
            assert sum(holders.values()) == STREAMS
            # The revocation, made through whichever process takes it, ends streams on both.
            assert (await http.delete(f"/v1/keys/{created['id']}")).status_code == 200
            for ended in await asyncio.gather(*(s.until_closed() for s in doomed)):
                assert b"UNAUTHENTICATED" in ended, ended
            survivors = [await open_stream(running.url, workspace.key) for _ in range(STREAMS)]
            assert len(await eventually(lambda: accepted_by(running, survivors))) == 2
            # /metrics answers for the whole serve, whichever process takes the scrape.
            for _ in range(4):
                async with httpx.AsyncClient(base_url=running.url) as fresh:
                    text = (await fresh.get("/metrics")).text
                assert "switchboard_processes_reporting 2" in text
                assert f'switchboard_open_streams{{kind="events_sse"}} {STREAMS}' in text
        # A stop drains every process: each stream is told to reconnect elsewhere.
        workers = running.workers()
        running.process.send_signal(signal.SIGTERM)
        for ended in await asyncio.gather(*(s.until_closed() for s in survivors)):
            assert b"event: error" in ended and b"UNAVAILABLE" in ended, ended
        async with asyncio.timeout(60):
            assert await running.process.wait() == 0
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive and len(gone) >= 2


CALLS = 12  # every call owned by one process by chance: 2 x 2^-12


async def open_call_streams(url: str, key: str, token: str, call_id: str) -> list[Connection]:
    """Two transcript streams (one as a browser opens it, with a stream token in `?token=`) and
    a WebSocket on a call, each on a connection of its own, their answers read."""
    opened = []
    upgrade = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
    bearer = f"Authorization: Bearer {key}\r\n"
    for target, extra in (
        (f"/v1/calls/{call_id}/transcript/stream", bearer),
        (f"/v1/calls/{call_id}/transcript/stream?token={token}", ""),
        (f"/v1/calls/{call_id}/stream", bearer + upgrade),
    ):
        connection = await Connection.open(url)
        connection.writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        answer = await connection.reader.readuntil(b"\r\n\r\n")
        status = b"HTTP/1.1 101" if "Upgrade" in extra else b"HTTP/1.1 200"
        assert answer.startswith(status), answer
        opened.append(connection)
    return opened


def sole_holder(serve: Serve, streams: list[Connection]) -> int | None:
    """The process holding every one of these streams, if one process holds them all."""
    held = accepted_by(serve, streams)
    if len(held) == 1 and sum(held.values()) == len(streams):
        return next(iter(held))
    return None


@pytest.mark.slow
async def test_each_calls_streams_are_served_by_the_one_worker_that_owns_the_call(
    own_database: str, nats_of_its_own: str, tmp_path: Path
) -> None:
    workspace = await new_workspace(own_database)
    async with serve(
        own_database, nats_of_its_own, "--workers", "2", "--role", "api", data_dir=tmp_path / "d"
    ) as running:
        assert running.url is not None
        async with httpx.AsyncClient(base_url=running.url, headers=workspace.headers) as http:
            body = {"to_number": "+14155550100", "from_number": "+14155550101"}
            calls = [(await http.post("/v1/calls", json=body)).json()["id"] for _ in range(CALLS)]
            tokens = {
                call: (await http.post("/v1/stream-tokens", json={"call_id": call})).json()["token"]
                for call in calls
            }
        streams = {
            call: await open_call_streams(running.url, workspace.key, tokens[call], call)
            for call in calls
        }
        # Whichever process accepted a connection, the one that owns its call holds it.
        owners = {
            call: await eventually(lambda h=held: sole_holder(running, h))
            for call, held in streams.items()
        }
        assert len(set(owners.values())) == 2, f"one process owns every call: {owners}"
        # And serves them: a turn reaches every stream of its call, the WebSocket's events too.
        bus = await connect_bus(nats_of_its_own)
        try:
            for call in calls:
                await bus.publish(
                    call_transcript_subject(workspace.id, call),
                    orjson.dumps(
                        {
                            "role": "agent",
                            "text": f"hello {call}",
                            "is_final": True,
                            "turn_id": "t1",
                            "ts": "2026-11-25T00:00:00Z",
                        }
                    ),
                )
        finally:
            await bus.close()
        for call, (first, second, _websocket) in streams.items():
            for connection in (first, second):
                async with asyncio.timeout(10):
                    line = await connection.reader.readuntil(f"hello {call}".encode())
                assert b"data:" in line
        async with httpx.AsyncClient(base_url=running.url) as fresh:
            text = (await fresh.get("/metrics")).text
        passed = re.search(r'switchboard_stream_handoffs_total\{outcome="passed"\} (\d+)', text)
        adopted = re.search(r'switchboard_stream_handoffs_total\{outcome="adopted"\} (\d+)', text)
        assert passed and adopted and passed.group(1) == adopted.group(1), text
        assert int(passed.group(1)) > 0
        # A stream asked for on a connection that has answered a request already stays where
        # the connection is, whoever owns its call: only a first request is passed on.
        kept_alive = await Connection.open(running.url)
        assert (await kept_alive.get("/v1/workspace", workspace.key))[0] == 200
        here = await eventually(lambda: sole_holder(running, [kept_alive]))
        elsewhere = next(call for call, owner in owners.items() if owner != here)
        kept_alive.request(f"/v1/calls/{elsewhere}/transcript/stream", workspace.key)
        answer = await kept_alive.reader.readuntil(b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert sole_holder(running, [kept_alive]) == here
        for held in [*streams.values(), [kept_alive]]:
            for connection in held:
                connection.writer.close()


@pytest.mark.slow
async def test_each_role_runs_alone_and_does_only_its_part(
    own_database: str, nats_of_its_own: str, tmp_path: Path
) -> None:
    workspace: Workspace = await new_workspace(own_database)
    receiver = Receiver().start()
    bus = await connect_bus(nats_of_its_own)
    try:
        only_api = ("--workers", "1", "--role", "api")
        async with serve(own_database, nats_of_its_own, *only_api, data_dir=tmp_path / "a") as api:
            assert api.url is not None
            # One gateway, named so in `ps`, and no consumers process.
            assert {w.name() for w in api.workers()} & {"sb-api-1", "sb-consumers"} == {"sb-api-1"}
            async with httpx.AsyncClient(base_url=api.url, headers=workspace.headers) as http:
                hook = await http.post("/v1/webhooks", json={"url": receiver.url})
                assert hook.status_code == 201, hook.text
                call = (
                    await http.post(
                        "/v1/calls",
                        json={"to_number": "+14155550100", "from_number": "+14155550101"},
                    )
                ).json()
                await Producer(bus.client).turn(
                    workspace.id,
                    call["id"],
                    role="user",
                    text="recorded by the recorder role",
                    is_final=True,
                    turn_id="trn_0000000000000000000001",
                )

                async def turns() -> list[str]:
                    body = (await http.get(f"/v1/calls/{call['id']}")).json()
                    return [t["text"] for t in body.get("turns", [])]

                # The api role alone records nothing and delivers nothing: those are the
                # consumers' work, waiting in their durable consumers on the bus.
                assert await turns() == []
                assert receiver.received == []
                async with serve(
                    own_database, nats_of_its_own, "--role", "recorder", data_dir=tmp_path / "r"
                ) as recorder:
                    assert recorder.url is None and "recorder (no HTTP port)" in recorder.banner
                    names = {w.name() for w in recorder.workers()}
                    assert "sb-consumers" in names
                    assert not any(name.startswith("sb-api") for name in names)
                    await eventually(turns, within=20)
                    assert await turns() == ["recorded by the recorder role"]
                    assert receiver.received == []
                async with serve(
                    own_database, nats_of_its_own, "--role", "webhooks", data_dir=tmp_path / "w"
                ) as webhooks:
                    assert webhooks.url is None and "webhooks (no HTTP port)" in webhooks.banner
                    got = await asyncio.to_thread(receiver.wait_for, 2, 30)
                    delivered = {orjson.loads(g.body)["event_type"] for g in got}
                    assert delivered == {"call.initiated", "call.transcription"}
    finally:
        await bus.close()
        receiver.stop()


LIMIT = 40


@pytest.mark.slow
async def test_the_request_limit_is_shared_by_two_workers(
    own_database: str, nats_of_its_own: str, tmp_path: Path
) -> None:
    workspace = await new_workspace(own_database)
    if seconds_to_reset(time.time()) < 30:  # the count starts again each minute: not mid-test
        await asyncio.sleep(seconds_to_reset(time.time()) + 0.1)
    async with serve(
        own_database,
        nats_of_its_own,
        *("--workers", "2", "--role", "api"),
        data_dir=tmp_path / "d",
        workspace_rate_per_minute=str(LIMIT),
        # A burst of the whole minute: this test is about the minute's count shared by the
        # workers (the burst allowance is tested in test_limits).
        workspace_burst_seconds="60",
    ) as running:
        assert running.url is not None
        # One kept-alive connection to each process.
        pool = [await Connection.open(running.url) for _ in range(16)]
        pinned: dict[int, Connection] = {}

        def holders() -> bool:
            for kept in pool:
                for pid in accepted_by(running, [kept]):
                    pinned.setdefault(pid, kept)
            return len(pinned) == 2

        await eventually(holders)
        first, second = pinned.values()
        admitted = {first: 0, second: 0}
        refusals = []
        for index in range(2 * LIMIT):
            connection = first if index % 2 == 0 else second
            status, headers = await connection.get("/v1/workspace", workspace.key)
            if status == 200:
                admitted[connection] += 1
            else:
                assert status == 429
                refusals.append(headers)
        total = sum(admitted.values())
        # Each process alone would admit LIMIT; together they admit LIMIT, plus at most what
        # one admits before it hears the other's last report.
        assert LIMIT <= total <= LIMIT + LIMIT // 4, admitted
        assert all(admitted.values())
        assert refusals, "nothing was refused"
        for headers in refusals:
            assert headers["x-ratelimit-limit"] == str(LIMIT)
            assert headers["x-ratelimit-remaining"] == "0"
            assert 1 <= int(headers["retry-after"]) <= 60
            assert headers["x-ratelimit-reset"] == headers["retry-after"]
        # Both processes refuse from now on.
        assert (await first.get("/v1/workspace", workspace.key))[0] == 429
        assert (await second.get("/v1/workspace", workspace.key))[0] == 429
        for kept in pool:
            kept.writer.close()


@pytest.mark.slow
async def test_a_worker_that_dies_is_started_again_and_the_other_keeps_its_streams(
    own_database: str, nats_of_its_own: str, tmp_path: Path
) -> None:
    workspace = await new_workspace(own_database)
    async with serve(
        own_database, nats_of_its_own, "--workers", "2", "--role", "api", data_dir=tmp_path / "d"
    ) as running:
        assert running.url is not None
        streams = [await open_stream(running.url, workspace.key) for _ in range(STREAMS)]
        holders = await eventually(lambda: accepted_by(running, streams))
        assert len(holders) == 2
        victim, survivor = sorted(holders)
        os.kill(victim, signal.SIGKILL)
        # The dead worker's streams are cut; the other's stay open and alive.
        kept = [s for s in streams if accepted_by(running, [s]).get(survivor)]
        assert len(kept) == holders[survivor]

        def replaced() -> bool:
            listening = listeners(running)
            return len(listening) == 2 and victim not in listening

        await eventually(replaced, within=60)

        async def serving() -> bool:
            async with httpx.AsyncClient(base_url=running.url, headers=workspace.headers) as h:
                statuses = [(await h.get("/v1/workspace")).status_code for _ in range(8)]
            return statuses == [200] * 8

        assert await eventually(serving, within=60)
        assert running.process.returncode is None
        async with httpx.AsyncClient(base_url=running.url) as fresh:
            text = (await fresh.get("/metrics")).text
        assert "switchboard_processes_reporting 2" in text
