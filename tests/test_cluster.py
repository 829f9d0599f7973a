"""The production topology, on one machine (issue 10, item 8): a three-node NATS cluster with
the JetStream streams replicated three times, two Switchboard replicas as real processes on one
Postgres, and a client reading a call's transcript (SSE) and its events (WebSocket) while a
producer plays the call. kill -9 the replica the client reads from, mid-call: the client resumes
on the other replica with its last cursor and gets every final turn and every envelope of the
call exactly once, in order. kill -9 the NATS node that replica uses, mid-call, once when it
also leads the streams and once when they are led elsewhere and store on while the replica
reconnects: the same, with the client still on its replica.

The clients are written against the wire (SPEC 5.1, 5.3, 5.4), not with switchboard.client: an
SSE reader that sends `Last-Event-ID` when it reconnects, a WebSocket reader that sends
`?last_event_id=`, each moving to the next replica when one fails, after a short pause as a
browser's EventSource would make."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.errors import NotFoundError
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from switchboard.bus.connection import Bus
from switchboard.events import (
    EVENTS_STREAM,
    TRANSCRIPTS_STREAM,
    call_events_subject,
    call_transcript_subject,
    make_envelope,
)
from switchboard.ids import new_id
from switchboard.producer import Producer
from tests.cluster import NatsCluster, NatsNode, Replica, replica_env, start_replica
from tests.harness import Workspace, eventually, new_workspace

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

REPLICAS = 3
TURNS = 24  # final turns in the call; each comes after two partials
KILL_AT_TURN = 8  # the kill comes once this many final turns are stored
BURST = 12  # events and final turns stored back to back right after the kill
FINAL_TURNS = TURNS + BURST // 2
PACE = 0.03  # seconds between the producer's steps: a call in progress, not a burst
RECONNECT_PAUSE = 0.3  # a client's pause before it reconnects (EventSource waits `retry:`)
CALL_BUDGET = 60.0  # the whole call, kills and resumes included


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    nodes = NatsCluster(tmp_path / "nats", size=3)
    try:
        await nodes.start()
        # Made here, replicated three times, before any replica starts: each replica's
        # `ensure_streams` must then find them as they are (SWITCHBOARD_STREAM_REPLICAS=3).
        await nodes.create_streams(replicas=REPLICAS)
        yield nodes
    finally:
        nodes.stop()


@dataclass
class Deployment:
    cluster: NatsCluster
    database_url: str
    workspace: Workspace
    replicas: list[Replica]


@pytest.fixture
async def deployment(
    cluster: NatsCluster, own_database: str, tmp_path: Path
) -> AsyncIterator[Deployment]:
    """Two replicas on one Postgres database and the NATS cluster, as production runs them."""
    env = replica_env(
        own_database,
        cluster.url,
        stream_replicas=str(REPLICAS),
        drain_seconds="1",
        shutdown_grace="1",
    )
    replicas: list[Replica] = []

    async def start(name: str) -> None:
        replicas.append(await asyncio.to_thread(start_replica, name, env, tmp_path))

    try:
        await asyncio.gather(start("A"), start("B"))  # both run migrations: they take turns
        replicas.sort(key=lambda replica: replica.name)
        workspace = await new_workspace(own_database, "cluster")
        yield Deployment(cluster, own_database, workspace, replicas)
    finally:
        await asyncio.gather(*(asyncio.to_thread(replica.stop) for replica in replicas))


# --- the producer -------------------------------------------------------------------------------


class Progress:
    """Wakes whoever waits for a count to be reached (in-process state, so no polling)."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()

    async def changed(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def until(self, condition: Callable[[], bool], within: float) -> None:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(condition)


@dataclass
class CallPlayer:
    """Plays one call as the media plane does, with `switchboard.producer.Producer`:
    `call.initiated`, turns (two partials, then the final, which Producer.turn also stores as
    `call.transcription`), other events, `call.quality`, `call.completed`. What the bus must
    keep is retried until it is stored, as a producer riding out a NATS node's death must: an
    envelope with the same `event_id` (the duplicate window drops a repeat), a final turn by
    calling Producer.turn again with the same `turn_id`."""

    client: Client
    workspace_id: str
    call_id: str = field(default_factory=lambda: new_id("call"))
    # What was stored, in order: ("event", envelope) or ("final", turn frame).
    timeline: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    stored_at: list[float] = field(default_factory=list)  # monotonic time of each entry
    progress: Progress = field(default_factory=Progress)
    producer: Producer = field(init=False)

    def __post_init__(self) -> None:
        self.producer = Producer(self.client)

    @property
    def finals(self) -> list[dict[str, Any]]:
        return [item for kind, item in self.timeline if kind == "final"]

    async def until_stored(self, what: str, attempt: Callable[[], Awaitable[object]]) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                await attempt()
                return
            except (NatsError, TimeoutError, ConnectionError):
                # No stream leader for a moment (an election), or our node is gone.
                assert time.monotonic() < deadline, f"the bus never stored {what}"
                await asyncio.sleep(0.2)

    async def stored(self, kind: str, item: dict[str, Any]) -> None:
        self.timeline.append((kind, item))
        self.stored_at.append(time.monotonic())
        await self.progress.changed()

    async def event(self, event_type: str, payload: dict[str, Any]) -> None:
        envelope = make_envelope(
            event_type,
            workspace_id=self.workspace_id,
            call_id=self.call_id,
            channel="voice",
            payload=payload,
        )
        await self.until_stored(event_type, lambda: self.producer.publish_envelope(envelope))
        await self.stored("event", envelope)

    async def turn(self, role: str, text: str, partials: bool = True) -> str:
        turn_id = Producer.new_turn_id()
        words = text.split()
        for cut in (1, 2) if partials else ():  # partials: live only, best effort
            await self.producer.turn(
                self.workspace_id,
                self.call_id,
                role=role,
                text=" ".join(words[:cut]),
                is_final=False,
                turn_id=turn_id,
            )
            await asyncio.sleep(PACE)
        await self.until_stored(
            f"final turn {turn_id}",
            lambda: self.producer.turn(
                self.workspace_id,
                self.call_id,
                role=role,
                text=text,
                is_final=True,
                turn_id=turn_id,
            ),
        )
        await self.stored("final", {"turn_id": turn_id, "role": role, "text": text})
        return turn_id

    async def begin(self) -> None:
        await self.event(
            "call.initiated",
            {
                "direction": "inbound",
                "from_number": "+14155550101",
                "to_number": "+14155550100",
                "transport": "sip",
            },
        )

    async def converse(
        self,
        mid_call: Callable[[], Awaitable[None]],
        after_burst: Callable[[], None] = lambda: None,
    ) -> None:
        """The call's turns and events; `mid_call` runs once KILL_AT_TURN final turns are
        stored, then a burst of events and final turns follows at once, unpaced, while whatever
        `mid_call` broke recovers; `after_burst` runs when the burst is stored."""
        for n in range(TURNS):
            if n == KILL_AT_TURN:
                await mid_call()
                for sample in range(BURST):
                    if sample % 2:
                        await self.turn("user", f"a quick final turn {sample}", partials=False)
                    else:
                        await self.event(
                            "call.quality_degraded",
                            {"metric": "jitter", "value": 40 + sample, "threshold": 30},
                        )
                after_burst()
            role = "user" if n % 2 == 0 else "agent"
            text = f"turn {n} from the {role}, with a few more words"
            if role == "agent":
                await self.event("call.agent_response", {"turn_id": new_id("trn"), "text": text})
            turn_id = await self.turn(role, text)
            if n % 5 == 3:
                await self.event(
                    "call.barge_in", {"turn_id": turn_id, "interrupted_text": text[:12]}
                )
            if n % 7 == 6:
                await self.event("call.idle_silence", {"silence_ms": 4000, "threshold_ms": 3000})
            if n % 9 == 4:
                await self.event(
                    "call.quality_degraded",
                    {"metric": "packet_loss", "value": 0.08, "threshold": 0.05},
                )
            await asyncio.sleep(PACE)
        await self.event(
            "call.quality", {"mos": 4.1, "packet_loss_pct": 0.4, "jitter_ms": 12, "rtt_ms": 80}
        )
        await self.event(
            "call.completed",
            {"status": "completed", "duration_seconds": 12, "ended_by": "caller"},
        )

    def stored_between(self, start: float, end: float) -> int:
        return sum(1 for moment in self.stored_at if start <= moment <= end)


# --- the clients --------------------------------------------------------------------------------


@dataclass
class Connection:
    """One connection a reader made: where, with which cursor, and how it ended."""

    base: str
    cursor: str | None
    opened_at: float
    frames: int = 0
    ended: str = ""


@dataclass
class Reader:
    """What a client read over all its connections."""

    bases: list[str]
    key: str
    call_id: str
    frames: list[dict[str, Any]] = field(default_factory=list)  # durable-frame payloads
    anomalies: list[str] = field(default_factory=list)  # gap, reset, unexpected errors
    connections: list[Connection] = field(default_factory=list)
    cursor: str | None = None
    done: bool = False
    progress: Progress = field(default_factory=Progress)
    lost_at: list[float] = field(default_factory=list)  # when a connection broke

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def run(self) -> None:
        index = 0
        while not self.done:
            base = self.bases[index % len(self.bases)]
            connection = Connection(base, self.cursor, time.monotonic())
            self.connections.append(connection)
            await self.progress.changed()
            try:
                await self.read(connection)
            except (httpx.TransportError, OSError, ConnectionClosed, InvalidHandshake) as broken:
                connection.ended = f"broken: {type(broken).__name__}"
            if not self.done:
                # The replica (or its bus) failed this client: the next one, after a pause.
                self.lost_at.append(time.monotonic())
                index += 1
                await asyncio.sleep(RECONNECT_PAUSE)
        await self.progress.changed()

    async def read(self, connection: Connection) -> None:
        raise NotImplementedError


@dataclass
class TranscriptReader(Reader):
    """SSE, as EventSource reads it: the last `id:` goes back as `Last-Event-ID`. The first
    connection asks for the whole call so far (`?from=start`)."""

    async def read(self, connection: Connection) -> None:
        url = f"{connection.base}/v1/calls/{self.call_id}/transcript/stream"
        headers = dict(self.auth)
        params = {}
        if self.cursor is not None:
            headers["Last-Event-ID"] = self.cursor
        else:
            params["from"] = "start"
        timeout = httpx.Timeout(10, read=None)
        async with (
            httpx.AsyncClient(timeout=timeout) as http,
            http.stream("GET", url, headers=headers, params=params) as response,
        ):
            if response.status_code != 200:
                await response.aread()
                connection.ended = f"status {response.status_code}: {response.text}"
                if response.status_code not in (502, 503, 504):
                    self.anomalies.append(connection.ended)
                    self.done = True
                return
            async for event in sse_events(response):
                if await self.frame(connection, event):
                    return
            connection.ended = "closed by the server without a terminal frame"

    async def frame(self, connection: Connection, event: dict[str, str]) -> bool:
        """Takes one SSE event; True when the stream has ended."""
        if "id" in event:
            self.cursor = event["id"]
        kind = event.get("event", "message")
        data = orjson.loads(event["data"]) if "data" in event else None
        if kind == "message" and isinstance(data, dict):
            connection.frames += 1
            if data.get("is_final"):
                self.frames.append(data)
                await self.progress.changed()
            return False
        if kind == "end":
            connection.ended = "end"
            self.done = True
            return True
        if kind == "error" and isinstance(data, dict):
            connection.ended = f"error {data.get('error_code')}"
            if data.get("error_code") not in ("UNAVAILABLE", "INTERNAL"):
                self.anomalies.append(connection.ended)
                self.done = True
            return True
        self.anomalies.append(f"{kind}: {event.get('data')}")  # gap, reset, anything else
        return False


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """SSE events as field dictionaries; comments (heartbeats) and `retry:` are skipped."""
    current: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if current:
                yield current
            current = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data" and "data" in current:
                current["data"] += "\n" + value
            elif name in ("id", "event", "data"):
                current[name] = value


@dataclass
class SocketReader(Reader):
    """The call WebSocket: the last envelope's `event_id` goes back as `?last_event_id=`. The
    first connection gets the call's envelopes so far (SPEC 5.3)."""

    async def read(self, connection: Connection) -> None:
        url = "ws://" + connection.base.removeprefix("http://")
        url += f"/v1/calls/{self.call_id}/stream"
        if self.cursor is not None:
            url += f"?last_event_id={self.cursor}"
        try:
            async with ws_connect(url, additional_headers=self.auth, open_timeout=10) as socket:
                async for message in socket:
                    assert isinstance(message, str), "no binary frames without listening"
                    await self.message(connection, orjson.loads(message))
        except InvalidStatus as refused:
            status = refused.response.status_code
            connection.ended = f"status {status}"
            if status not in (502, 503, 504):
                self.anomalies.append(connection.ended)
                self.done = True
            return
        except ConnectionClosed as closed:
            connection.ended = f"close {closed.rcvd.code if closed.rcvd else 1006}"
            if closed.rcvd is None or closed.rcvd.code in (1011, 1012):
                return  # reconnect
            self.anomalies.append(connection.ended)
            self.done = True
            return
        # A clean close: 1000 after call.completed.
        connection.ended = "close 1000"
        self.done = True

    async def message(self, connection: Connection, body: dict[str, Any]) -> None:
        kind = body.get("event_type", "")
        if kind in ("stream.gap", "stream.reset"):
            self.anomalies.append(orjson.dumps(body).decode())
            return
        if kind == "command.result":
            return
        connection.frames += 1
        self.frames.append(body)
        self.cursor = body["event_id"]
        await self.progress.changed()


# --- checks -------------------------------------------------------------------------------------


def describe(reader: Reader) -> str:
    lines = [
        f"  {c.base} cursor={c.cursor} frames={c.frames} ended={c.ended}"
        for c in reader.connections
    ]
    return "\n".join([*lines, f"  anomalies: {reader.anomalies}"])


async def stored_on(cluster: NatsCluster, stream: str, subject: str) -> list[Any]:
    """Every message `stream` holds on `subject`, decoded, in stream order."""
    client = await cluster.connect()
    try:
        js = client.jetstream()
        found: list[Any] = []
        seq = 0
        while True:
            try:
                raw = await js.get_msg(stream, seq=seq + 1, subject=subject, next=True)
            except NotFoundError:
                return found
            seq = int(raw.seq or 0)
            found.append(orjson.loads(raw.data or b"{}"))
    finally:
        await client.close()


def missing_and_repeated(got: list[str], want: list[str]) -> str:
    missing = [item for item in want if item not in got]
    repeated = sorted({item for item in got if got.count(item) > 1})
    return f"missing {missing}, repeated {repeated}, received {len(got)} of {len(want)}"


def unlike_the_call(stored: list[dict[str, Any]], player: CallPlayer) -> str | None:
    """How the envelopes the bus holds for the call differ from the call as the producer
    stored it (one envelope per event, one `call.transcription` per final turn, in order), or
    None."""
    for index, (envelope, (kind, item)) in enumerate(zip(stored, player.timeline, strict=False)):
        if kind == "event":
            same = envelope["event_id"] == item["event_id"]
        else:
            same = (
                envelope["event_type"] == "call.transcription"
                and envelope["payload"]["turn_id"] == item["turn_id"]
            )
        if not same:
            return f"at {index}: the bus holds {envelope}, the producer stored {kind} {item}"
    if len(stored) != len(player.timeline):
        return f"the bus holds {len(stored)} envelopes, the producer stored {len(player.timeline)}"
    return None


async def check_everything_once_in_order(
    cluster: NatsCluster, player: CallPlayer, transcript: TranscriptReader, socket: SocketReader
) -> None:
    """The transcript stream gave every final turn and the socket every envelope of the call,
    each once, in order; neither reported a gap or a reset."""
    assert len(player.finals) == FINAL_TURNS
    stored = await stored_on(
        cluster, EVENTS_STREAM, call_events_subject(player.workspace_id, player.call_id)
    )
    problems = []
    if (difference := unlike_the_call(stored, player)) is not None:
        problems.append(f"the call on the bus is not the call as played: {difference}")
    got_turns = [t["turn_id"] for t in transcript.frames]
    want_turns = [t["turn_id"] for t in player.finals]
    if got_turns != want_turns:
        subject = call_transcript_subject(player.workspace_id, player.call_id)
        try:  # where they were lost: on the bus, or between the bus and the client?
            kept = await stored_on(cluster, TRANSCRIPTS_STREAM, subject)
            on_the_bus = missing_and_repeated(
                [t["turn_id"] for t in kept if t.get("is_final")], want_turns
            )
        except (NatsError, TimeoutError) as unknown:
            on_the_bus = f"unknown ({unknown!r})"
        problems.append(
            "final turns on the transcript stream: "
            + missing_and_repeated(got_turns, want_turns)
            + f"; on the bus ({TRANSCRIPTS_STREAM}): {on_the_bus}\n"
            + describe(transcript)
        )
    got_ids = [e["event_id"] for e in socket.frames]
    want_ids = [e["event_id"] for e in stored]
    if got_ids != want_ids:
        problems.append(
            "envelopes on the call WebSocket: "
            + missing_and_repeated(got_ids, want_ids)
            + "\n"
            + describe(socket)
        )
    assert not problems, "\n".join(problems)
    assert [(t["role"], t["text"]) for t in transcript.frames] == [
        (t["role"], t["text"]) for t in player.finals
    ]
    assert socket.frames == stored  # as the bus holds them, byte for byte
    assert transcript.anomalies == [], describe(transcript)
    assert socket.anomalies == [], describe(socket)


async def check_streams_replicated(cluster: NatsCluster) -> None:
    """Each stream is still kept by three servers once the replicas have started."""
    client = await cluster.connect()
    try:
        js = client.jetstream()
        for config in Bus(client).stream_configs():
            info = await js.stream_info(config.name or "")
            assert info.config.num_replicas == REPLICAS, (
                f"{config.name} is kept by {info.config.num_replicas} servers: a replica's "
                "ensure_streams changed it (SWITCHBOARD_STREAM_REPLICAS not applied?)"
            )
    finally:
        await client.close()


@contextlib.contextmanager
def readers_reported(*readers: Reader) -> Iterator[None]:
    """On a failure, says what each reader's connections did."""
    try:
        yield
    except BaseException as failure:
        report = "\n".join(f"{type(r).__name__}:\n{describe(r)}" for r in readers)
        failure.add_note(report)
        raise


def open_readers(
    deployment: Deployment, call_id: str, bases: list[str]
) -> tuple[TranscriptReader, SocketReader, list[asyncio.Task[None]]]:
    """A client of the call on `bases` (the first one first): its transcript and its socket."""
    key = deployment.workspace.key
    transcript = TranscriptReader(bases, key, call_id)
    socket = SocketReader(bases, key, call_id)
    tasks = [asyncio.create_task(transcript.run()), asyncio.create_task(socket.run())]
    return transcript, socket, tasks


# --- the tests ----------------------------------------------------------------------------------


async def play_with_a_kill(
    player: CallPlayer,
    transcript: TranscriptReader,
    socket: SocketReader,
    tasks: list[asyncio.Task[None]],
    kill: Callable[[], None],
    after_burst: Callable[[], None] = lambda: None,
) -> float:
    """Plays the call to its end with `kill` in the middle, while the client reads it; returns
    when the kill happened, once the call and both streams have ended."""
    killed_at = 0.0

    async def mid_call() -> None:
        nonlocal killed_at
        # The client is reading both streams (it has had turns and envelopes) when it happens.
        await transcript.progress.until(lambda: len(transcript.frames) >= 1, 10)
        kill()
        killed_at = time.monotonic()

    with readers_reported(transcript, socket):
        async with asyncio.timeout(CALL_BUDGET):
            await player.begin()
            await socket.progress.until(lambda: len(socket.frames) >= 1, within=15)
            await player.converse(mid_call, after_burst)
            await asyncio.gather(*tasks)
    assert killed_at > 0
    return killed_at


async def test_a_client_resumes_on_another_replica_after_kill_9_and_misses_nothing(
    deployment: Deployment,
) -> None:
    await check_streams_replicated(deployment.cluster)
    a, b = deployment.replicas
    producer_client = await deployment.cluster.connect()
    player = CallPlayer(producer_client, deployment.workspace.id)
    transcript, socket, tasks = open_readers(deployment, player.call_id, [a.url, b.url])

    def kill_a() -> None:
        assert {c.base for c in transcript.connections + socket.connections} == {a.url}
        a.kill()  # mid-call, with turns and events still coming: A dies without a word

    try:
        killed_at = await play_with_a_kill(player, transcript, socket, tasks, kill_a)
        with readers_reported(transcript, socket):
            await check_everything_once_in_order(deployment.cluster, player, transcript, socket)
            for reader in (transcript, socket):
                # It read from A, lost it, and resumed on B with its cursor.
                first, *_, last = reader.connections
                assert first.base == a.url and first.frames > 0
                assert last.base == b.url and last.cursor is not None
                assert reader.lost_at and reader.lost_at[0] >= killed_at
                # Frames were stored while it had no replica: B replayed them.
                resumed_at = next(c.opened_at for c in reader.connections if c.base == b.url)
                assert player.stored_between(reader.lost_at[0], resumed_at) > 0
    finally:
        for task in tasks:
            task.cancel()
        await producer_client.close()


@pytest.mark.parametrize(
    "leads_the_streams",
    [
        pytest.param(
            True,
            id="the-node-also-leads-the-streams",
        ),
        pytest.param(
            False,
            id="the-streams-store-on-while-the-replica-reconnects",
        ),
    ],
)
async def test_a_client_misses_nothing_when_the_nats_node_of_its_replica_is_killed(
    deployment: Deployment, leads_the_streams: bool
) -> None:
    """Replica A loses its bus connection and reconnects to another node by itself; its client
    stays connected to it. When the killed node also leads the streams, nothing is stored
    until a new leader is elected (seconds) and the producer retries. When the streams are led
    elsewhere, they go on storing while A reconnects: A is held (SIGSTOP) from the kill until
    the burst that follows it is stored, as a slow reconnect or a short partition would, so
    frames are certainly stored (and republished) while A has no subscription."""
    await check_streams_replicated(deployment.cluster)
    cluster = deployment.cluster
    a, b = deployment.replicas
    (doomed,) = cluster.nodes_used_by(a.pid)
    survivors: list[NatsNode] = [node for node in cluster.nodes if node is not doomed]
    admin = await nats.connect(servers=[cluster.node_url(n) for n in survivors])
    try:
        for config in Bus(admin).stream_configs():
            leader = doomed if leads_the_streams else survivors[0]
            await cluster.move_stream_leader(admin, config.name or "", leader)
    finally:
        await admin.close()

    def kill() -> None:
        if not leads_the_streams:
            a.pause()
        cluster.kill(doomed)

    # The producer is on a node that survives: what is tested is the gateway, and the stream's
    # failover under a producer that retries until the bus has stored its event.
    producer_client = await nats.connect(
        servers=[cluster.node_url(n) for n in survivors],
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
    )
    player = CallPlayer(producer_client, deployment.workspace.id)
    transcript, socket, tasks = open_readers(deployment, player.call_id, [a.url, b.url])
    try:
        await play_with_a_kill(player, transcript, socket, tasks, kill, a.resume)
        with readers_reported(transcript, socket):
            await check_everything_once_in_order(deployment.cluster, player, transcript, socket)
            # A is connected to a surviving node, which it found by itself.
            now_used = await eventually(lambda: cluster.nodes_used_by(a.pid), within=10)
            assert {n.name for n in now_used} <= {n.name for n in survivors}
        # Restarted on its ports and store, the node catches up: three copies again.
        await cluster.restart(doomed)
        for config in Bus(producer_client).stream_configs():
            await cluster.wait_stream_current(producer_client, config.name or "", REPLICAS)
    finally:
        a.resume()
        for task in tasks:
            task.cancel()
        await producer_client.close()
