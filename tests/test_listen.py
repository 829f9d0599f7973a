"""Listening (SPEC 5.3) on a real server, a real NATS and real clients: a call's audio published
on `.audio` reaches the sockets that asked for it as binary frames, in order and intact, at the
producer's pace; it is bounded per listener and never in the way of events; it is isolated by
workspace; one bus subscription serves every listener of a replica; `switchboard listen` writes
what it heard to a WAV file or to stdout."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import wave
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from switchboard.events import EventError, call_audio_subject
from switchboard.live.audio import BUFFER_CHUNKS, CHUNK_BYTES
from switchboard.live.hub import View
from switchboard.live.outbox import Outbox
from switchboard.producer import Producer
from tests.harness import ServerThread, Workspace, eventually
from tests.test_stream_hardening import port_of, stalled_count
from tests.test_streams import new_call, ws_url

WAIT = 10.0
SAMPLES = CHUNK_BYTES // 2


def chunk(index: int) -> bytes:
    """Chunk `index` of a known signal: its first sample is the index (so a received chunk says
    which it was), the rest a ramp that differs from chunk to chunk, in full 16-bit range."""
    ramp = [((index * 7919 + k * 211) % 65536) - 32768 for k in range(1, SAMPLES)]
    return struct.pack(f"<{SAMPLES}h", index, *ramp)


def index_of(pcm: bytes) -> int:
    return int(struct.unpack_from("<h", pcm)[0])


def samples(pcm: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(pcm) // 2}h", pcm)


async def publish_paced(producer: Producer, ws: str, call_id: str, indices: Sequence[int]) -> None:
    """One chunk every 20 ms on a steady clock, as a media plane would."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for n, index in enumerate(indices):
        delay = start + n * 0.02 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await producer.audio(ws, call_id, chunk(index))
    await producer.client.flush()


async def sentinel(producer: Producer, ws: str, call_id: str) -> str:
    """Publishes an event and returns its id: read up to it to know what came before."""
    envelope = await producer.event(
        "call.idle_silence",
        workspace_id=ws,
        call_id=call_id,
        payload={"silence_ms": 5000, "threshold_ms": 4000},
    )
    return str(envelope["event_id"])


async def command(peer: ClientConnection, action: str, request_id: str) -> list[bytes]:
    """Sends a command and reads up to its result (which must be ok); returns the binary
    frames that came before it."""
    await peer.send(orjson.dumps({"action": action, "request_id": request_id}).decode())
    before: list[bytes] = []
    while True:
        message = await asyncio.wait_for(peer.recv(), WAIT)
        if isinstance(message, bytes):
            before.append(message)
            continue
        body = orjson.loads(message)
        if body.get("event_type") == "command.result" and body["request_id"] == request_id:
            assert body["ok"] is True, body
            return before


async def read_until_event(peer: ClientConnection, event_id: str) -> list[bytes]:
    """The binary frames received before the event with this id. Not a barrier for audio: the
    server sends a waiting event before waiting audio."""
    frames: list[bytes] = []
    while True:
        message = await asyncio.wait_for(peer.recv(), WAIT)
        if isinstance(message, bytes):
            frames.append(message)
        elif orjson.loads(message).get("event_id") == event_id:
            return frames


async def binary_frames(peer: ClientConnection, count: int) -> AsyncIterator[tuple[float, bytes]]:
    """The next `count` binary frames with the time each arrived (text frames are skipped)."""
    clock = asyncio.get_running_loop().time
    while count:
        message = await asyncio.wait_for(peer.recv(), WAIT)
        if isinstance(message, bytes):
            count -= 1
            yield clock(), message


def audio_topic(server: ServerThread, ws: str, call_id: str) -> Any:
    services = server.services
    assert services is not None
    subject = call_audio_subject(ws, call_id)
    return server.call(lambda: services.hub.topics.get(subject))


def listeners(server: ServerThread, ws: str, call_id: str) -> int:
    topic = audio_topic(server, ws, call_id)
    if topic is None or topic.subscription is None:
        return 0
    return len(topic.watchers.get(View.AUDIO, ()))


async def metric(server: ServerThread, line: str) -> int:
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as http:
        text = (await http.get("/metrics")).text
    found = [x for x in text.splitlines() if x.startswith(line + " ")]
    return int(found[0].split()[-1]) if found else 0


AUDIO_SENT = 'switchboard_audio_bytes_sent_total{kind="call_websocket"}'
AUDIO_DROPPED = 'switchboard_audio_chunks_dropped_total{kind="call_websocket"}'
WRONG_SIZE = 'switchboard_live_messages_rejected_total{reason="audio_size"}'


@pytest.fixture
def producer(bus: Client) -> Producer:
    return Producer(bus)


# --- frames, pace, order, content ------------------------------------------------------------


async def test_a_listener_gets_the_published_pcm_as_640_byte_frames_at_50_a_second(
    server: ServerThread, client: httpx.AsyncClient, workspace: Workspace, producer: Producer
) -> None:
    call_id = await new_call(client, workspace)
    count = 150  # three seconds
    async with ws_connect(ws_url(server, call_id), additional_headers=workspace.headers) as peer:
        assert await command(peer, "listen", "r2") == []  # a call with no audio yet: no frames
        publishing = asyncio.create_task(
            publish_paced(producer, workspace.id, call_id, range(count))
        )
        received = [frame async for frame in binary_frames(peer, count)]
        await publishing
    # Live only: no stream of the bus keeps a call's audio.
    with pytest.raises(NotFoundError):
        await producer.js.find_stream_name_by_subject(call_audio_subject(workspace.id, call_id))
    assert all(len(pcm) == CHUNK_BYTES for _, pcm in received)
    assert [index_of(pcm) for _, pcm in received] == list(range(count))  # none lost, in order
    heard = samples(b"".join(pcm for _, pcm in received))
    assert heard == samples(b"".join(chunk(n) for n in range(count)))
    span = received[-1][0] - received[0][0]
    rate = (count - 1) / span
    assert 35 <= rate <= 70, f"{rate:.1f} frames a second"


async def test_unlisten_stops_the_frames_and_frees_the_subscription(
    server: ServerThread, client: httpx.AsyncClient, workspace: Workspace, producer: Producer
) -> None:
    call_id = await new_call(client, workspace)
    async with ws_connect(ws_url(server, call_id), additional_headers=workspace.headers) as peer:
        await command(peer, "listen", "r1")
        publishing = asyncio.create_task(publish_paced(producer, workspace.id, call_id, range(100)))
        try:
            heard = [pcm async for _, pcm in binary_frames(peer, 10)]
            assert [index_of(pcm) for pcm in heard] == list(range(10))
            await command(peer, "unlisten", "r2")
            await eventually(lambda: audio_topic(server, workspace.id, call_id) is None)
            await publishing  # the rest of the audio goes out with nobody listening
            # Nothing follows the result of unlisten, up to an event published after the audio.
            assert (
                await read_until_event(peer, await sentinel(producer, workspace.id, call_id)) == []
            )
            # A second listen hears again, from the present.
            await command(peer, "listen", "r3")
            await producer.audio(workspace.id, call_id, chunk(500))
            again = [pcm async for _, pcm in binary_frames(peer, 1)]
            assert [index_of(pcm) for pcm in again] == [500]
        finally:
            publishing.cancel()


async def test_a_socket_that_never_listened_gets_no_binary_frame(
    server: ServerThread, client: httpx.AsyncClient, workspace: Workspace, producer: Producer
) -> None:
    call_id = await new_call(client, workspace)
    url, headers = ws_url(server, call_id), workspace.headers
    async with (
        ws_connect(url, additional_headers=headers) as listener,
        ws_connect(url, additional_headers=headers) as watcher,
    ):
        await command(listener, "listen", "r1")
        await publish_paced(producer, workspace.id, call_id, range(25))
        heard = [index_of(pcm) async for _, pcm in binary_frames(listener, 25)]
        assert heard == list(range(25))  # audio was flowing, and has all been sent
        # The other socket was never offered any, and none came up to a later event.
        assert listeners(server, workspace.id, call_id) == 1
        event_id = await sentinel(producer, workspace.id, call_id)
        assert await read_until_event(watcher, event_id) == []


# --- isolation and the bus -------------------------------------------------------------------


async def test_only_the_callers_workspace_and_call_are_heard(
    server: ServerThread,
    client: httpx.AsyncClient,
    workspace: Workspace,
    other_workspace: Workspace,
    producer: Producer,
) -> None:
    call_id = await new_call(client, workspace)
    # Another workspace's key: the plain 404 before any upgrade, so nothing to listen on.
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(ws_url(server, call_id), additional_headers=other_workspace.headers):
            pass
    assert refused.value.response.status_code == 404
    assert orjson.loads(refused.value.response.body or b"{}")["error_code"] == "NOT_FOUND"
    other_call = await new_call(client, workspace)
    async with ws_connect(ws_url(server, call_id), additional_headers=workspace.headers) as peer:
        await command(peer, "listen", "r1")
        # Audio for the same call id under another workspace, and another call's audio, before
        # this call's: the subscription is the principal's workspace and the path's call, and
        # the bus keeps one publisher's order, so a wider subscription would hear 1 or 2 first.
        await producer.client.publish(call_audio_subject(other_workspace.id, call_id), chunk(1))
        await producer.audio(workspace.id, other_call, chunk(2))
        await producer.audio(workspace.id, call_id, chunk(3))
        assert [index_of(pcm) async for _, pcm in binary_frames(peer, 1)] == [3]


async def test_a_bus_message_that_is_not_a_640_byte_chunk_is_dropped_and_counted(
    server: ServerThread, client: httpx.AsyncClient, workspace: Workspace, producer: Producer
) -> None:
    call_id = await new_call(client, workspace)
    subject = call_audio_subject(workspace.id, call_id)
    with pytest.raises(EventError, match="640 bytes"):
        await producer.audio(workspace.id, call_id, chunk(1)[:-2])
    before = await metric(server, WRONG_SIZE)
    async with ws_connect(ws_url(server, call_id), additional_headers=workspace.headers) as peer:
        await command(peer, "listen", "r1")
        for size in (0, 1, 639, 641, 1280):
            await producer.client.publish(subject, (chunk(9) * 2)[:size])
        await producer.audio(workspace.id, call_id, chunk(7))
        # In order on one subscription: anything let through would have come first.
        heard = [pcm async for _, pcm in binary_frames(peer, 1)]
    assert [(len(pcm), index_of(pcm)) for pcm in heard] == [(CHUNK_BYTES, 7)]
    assert await metric(server, WRONG_SIZE) == before + 5


async def test_one_audio_subscription_per_replica_however_many_listeners(
    server: ServerThread, client: httpx.AsyncClient, workspace: Workspace, producer: Producer
) -> None:
    services = server.services
    assert services is not None
    call_id = await new_call(client, workspace)
    url, headers = ws_url(server, call_id), workspace.headers
    async with (
        ws_connect(url, additional_headers=headers) as a,
        ws_connect(url, additional_headers=headers) as b,
        ws_connect(url, additional_headers=headers) as c,
    ):
        before = server.call(services.hub.subscription_count)
        for n, peer in enumerate((a, b, c)):
            await command(peer, "listen", f"r{n}")
        assert listeners(server, workspace.id, call_id) == 3
        assert server.call(services.hub.subscription_count) == before + 1
        await producer.audio(workspace.id, call_id, chunk(42))
        for peer in (a, b, c):
            assert [index_of(pcm) async for _, pcm in binary_frames(peer, 1)] == [42]
        await command(a, "unlisten", "u1")
        await command(b, "unlisten", "u2")
        assert listeners(server, workspace.id, call_id) == 1
        await c.close()  # the last listener leaves without unlisten: freed all the same
        await eventually(lambda: audio_topic(server, workspace.id, call_id) is None)
        assert server.call(services.hub.subscription_count) == before


# --- a listener that falls behind ------------------------------------------------------------


def client_frame(text: str) -> bytes:
    """A masked text frame, as a client must send it."""
    payload, mask = text.encode(), os.urandom(4)
    assert len(payload) < 126
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


class RawListener:
    """A WebSocket client on a bare socket with a small receive buffer, that reads only when
    told to: the server's writes to it block as soon as it stops."""

    def __init__(self, server: ServerThread, call_id: str, key: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.setblocking(False)
        self.server, self.call_id, self.key = server, call_id, key
        self.buffer = b""

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, ("127.0.0.1", port_of(self.server)))
        await loop.sock_sendall(
            self.sock,
            (
                f"GET /v1/calls/{self.call_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                f"Authorization: Bearer {self.key}\r\n\r\n"
            ).encode(),
        )
        while b"\r\n\r\n" not in self.buffer:
            await self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    async def send(self, text: str) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, client_frame(text))

    async def _fill(self) -> None:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 65536), WAIT)
        assert data, "the server closed the connection"
        self.buffer += data

    async def frame(self) -> tuple[int, bytes]:
        """The next (opcode, payload) the server sent."""
        while True:
            data = self.buffer
            if len(data) >= 2:
                length, at = data[1] & 0x7F, 2
                if length == 126:
                    length, at = int.from_bytes(data[2:4], "big"), 4
                elif length == 127:
                    length, at = int.from_bytes(data[2:10], "big"), 10
                if len(data) >= at and at + length <= len(data):
                    self.buffer = data[at + length :]
                    return data[0] & 0x0F, data[at : at + length]
            await self._fill()

    async def until_result(self, request_id: str) -> None:
        while True:
            opcode, payload = await self.frame()
            if opcode == 0x1 and orjson.loads(payload).get("request_id") == request_id:
                assert orjson.loads(payload)["ok"] is True
                return

    def close(self) -> None:
        self.sock.close()


async def publish_until(
    producer: Producer, ws: str, call_id: str, done: Callable[[], Any], first: int = 0
) -> int:
    """Publishes audio in bursts of a second's worth (letting the server write between them)
    until `done()`; returns the index of the next chunk."""
    index = first
    while not done():
        for _ in range(BUFFER_CHUNKS):
            await producer.audio(ws, call_id, chunk(index))
            index += 1
        await producer.client.flush()
        assert index < first + 20_000, "the listener never fell behind"
    return index


def open_streams(server: ServerThread) -> set[Outbox]:
    """The outboxes of the server's open streams (other tests' may still be closing)."""
    services = server.services
    assert services is not None
    return set(server.call(lambda: list(services.registry.streams)))


async def new_stream(server: ServerThread, before: set[Outbox]) -> Outbox:
    """The outbox of the one stream opened since `before` was taken."""
    opened: set[Outbox] = set()

    def one_more() -> bool:
        opened.update(open_streams(server) - before)
        return len(opened) == 1

    await eventually(one_more)
    return opened.pop()


def queued(server: ServerThread, box: Outbox) -> tuple[int, int | None, bool]:
    """(frames, audio chunks or None when not listening, whether a write is waiting) of one
    stream, read on the server's loop."""

    def read() -> tuple[int, int | None, bool]:
        audio = None if box.audio is None else len(box.audio)
        return len(box), audio, box.writing_since is not None

    frames, audio, waiting = server.call(read)
    return frames, audio, waiting


async def test_a_listener_that_stops_reading_loses_old_audio_but_not_its_events(
    server: ServerThread, client: httpx.AsyncClient, workspace: Workspace, producer: Producer
) -> None:
    services = server.services
    assert services is not None
    call_id = await new_call(client, workspace)
    dropped_before = await metric(server, AUDIO_DROPPED)
    listener = RawListener(server, call_id, workspace.key)
    try:
        before_open = open_streams(server)
        await listener.open()
        box = await new_stream(server, before_open)
        await listener.send('{"action": "listen", "request_id": "r1"}')
        await listener.until_result("r1")
        # The listener reads nothing now: the server's writes to it block, and its buffer of
        # audio stays at a second however much more comes.
        highest: list[int] = []

        def behind() -> bool:
            # A write waits on the listener (seen from another task, `send` is suspended), and
            # it has lost audio since.
            _, audio, waiting = queued(server, box)
            highest.append(audio or 0)
            dropped = server.call(lambda: 0 if box.audio is None else box.audio.dropped)
            return waiting and dropped > 100

        end = await publish_until(producer, workspace.id, call_id, behind)
        assert max(highest) <= BUFFER_CHUNKS
        event_id = await sentinel(producer, workspace.id, call_id)
        await eventually(lambda: queued(server, box)[0] == 1)
        # At most the newest second of audio waits (the kernel may still take a little now and
        # then), and the event waits for no room.
        frames, audio, waiting = queued(server, box)
        assert frames == 1 and audio is not None and 0 < audio <= BUFFER_CHUNKS and waiting
        # It reads again: the event comes at once, before the second of audio still queued.
        clock = asyncio.get_running_loop().time
        resumed = clock()
        before: list[int] = []
        while True:
            opcode, payload = await listener.frame()
            if opcode == 0x2:
                before.append(index_of(payload))
            elif opcode == 0x1 and orjson.loads(payload).get("event_id") == event_id:
                break
        assert clock() - resumed < 2.0
        after: list[int] = []
        while not after or after[-1] != end - 1:  # up to the last chunk published
            opcode, payload = await listener.frame()
            assert opcode == 0x2
            after.append(index_of(payload))
    finally:
        listener.close()
    heard = before + after
    assert heard == sorted(heard) and len(set(heard)) == len(heard)  # in order, once each
    # Behind the event: the newest audio, at most a second of it.
    assert 0 < len(after) <= BUFFER_CHUNKS and after == list(range(end - len(after), end))
    assert len(heard) < end  # old audio was lost, and every chunk lost was counted
    assert await metric(server, AUDIO_DROPPED) == dropped_before + end - len(heard)


@pytest.fixture(scope="module")
def quick_server(make_server: Callable[..., ServerThread]) -> ServerThread:
    # A write blocked for 3 s is a stall. Loopback takes about 3 MB before a write blocks; the
    # listener must be blocked before the server's unanswered ping closes it (at 3 s), or it
    # would be let go for that instead, as any peer that does not pong.
    return make_server(heartbeat_interval=1.5)


async def test_a_listener_that_stops_reading_for_good_is_cut_off_and_freed(
    quick_server: ServerThread, workspace: Workspace, producer: Producer
) -> None:
    server = quick_server
    services = server.services
    assert services is not None
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as http:
        call_id = await new_call(http, workspace)
    stalls_before = await stalled_count(server, "call_websocket")
    listener = RawListener(server, call_id, workspace.key)
    try:
        before_open = open_streams(server)
        await listener.open()
        box = await new_stream(server, before_open)
        await listener.send('{"action": "listen", "request_id": "r1"}')
        await listener.until_result("r1")
        await publish_until(producer, workspace.id, call_id, lambda: queued(server, box)[2])
        # No more audio is needed: a write has waited on the listener since.
        await eventually(lambda: box not in open_streams(server))
        await eventually(lambda: audio_topic(server, workspace.id, call_id) is None)
        assert await stalled_count(server, "call_websocket") == stalls_before + 1
    finally:
        listener.close()


# --- the command line ------------------------------------------------------------------------


async def test_switchboard_listen_writes_a_wav_file_and_raw_pcm_of_what_it_heard(
    server: ServerThread,
    client: httpx.AsyncClient,
    workspace: Workspace,
    producer: Producer,
    tmp_path: Path,
) -> None:
    call_id = await new_call(client, workspace)
    wav_path = tmp_path / "call.wav"
    env = {**os.environ, "SWITCHBOARD_API_KEY": workspace.key}

    async def cli(output: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "switchboard",
            "listen",
            call_id,
            "-o",
            output,
            "--url",
            server.url,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    to_file, to_stdout = await cli(str(wav_path)), await cli("-")
    try:
        await eventually(lambda: listeners(server, workspace.id, call_id) == 2, within=30)
        sent_before = await metric(server, AUDIO_SENT)
        count = 100
        await publish_paced(producer, workspace.id, call_id, range(count))

        # Both have been sent everything (the end may discard audio not yet sent), then it ends.
        async def all_sent() -> bool:
            return await metric(server, AUDIO_SENT) >= sent_before + 2 * count * CHUNK_BYTES

        await eventually(all_sent)
        response = await client.delete(f"/v1/calls/{call_id}", headers=workspace.headers)
        assert response.status_code == 200
        (_, file_err), (raw, raw_err) = await asyncio.wait_for(
            asyncio.gather(to_file.communicate(), to_stdout.communicate()), WAIT
        )
    finally:
        for process in (to_file, to_stdout):
            if process.returncode is None:
                process.kill()
    assert to_file.returncode == 0, file_err.decode()
    assert to_stdout.returncode == 0, raw_err.decode()
    published = b"".join(chunk(n) for n in range(count))
    with wave.open(str(wav_path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 16_000)
        assert wav.getnframes() == count * SAMPLES  # two seconds
        assert samples(wav.readframes(wav.getnframes())) == samples(published)
    assert raw == published
    assert b"call ended" in file_err and workspace.key.encode() not in file_err + raw_err


async def test_switchboard_listen_stops_on_ctrl_c_and_leaves_a_playable_wav(
    server: ServerThread,
    client: httpx.AsyncClient,
    workspace: Workspace,
    producer: Producer,
    tmp_path: Path,
) -> None:
    call_id = await new_call(client, workspace)
    wav_path = tmp_path / "call.wav"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "switchboard",
        "listen",
        call_id,
        "-o",
        str(wav_path),
        "--url",
        server.url,
        env={**os.environ, "SWITCHBOARD_API_KEY": workspace.key},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        await eventually(lambda: listeners(server, workspace.id, call_id) == 1, within=30)
        await publish_paced(producer, workspace.id, call_id, range(30))
        await eventually(lambda: wav_path.stat().st_size >= 44 + 30 * CHUNK_BYTES)
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), WAIT)
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 0, err.decode()
    assert b"stopped: 0.60 s" in err
    with wave.open(str(wav_path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 16_000)
        assert wav.readframes(wav.getnframes()) == b"".join(chunk(n) for n in range(30))


SHED = 'switchboard_audio_chunks_shed_total{reason="loop_late"}'


async def test_while_the_event_loop_runs_late_audio_is_shed_and_counted_not_sent(
    server: ServerThread, client: httpx.AsyncClient, workspace: Workspace, producer: Producer
) -> None:
    call_id = await new_call(client, workspace)
    assert server.services is not None
    lag = server.services.hub.lag
    before = await metric(server, SHED)
    async with ws_connect(ws_url(server, call_id), additional_headers=workspace.headers) as peer:
        await command(peer, "listen", "r1")

        def overloaded() -> None:
            lag.stop()  # hold the sampler's verdict: the loop is late
            lag.lagging = True

        def recovered() -> None:
            lag.lagging = False
            lag.start()

        server.call(overloaded)
        try:
            for index in range(5):
                await producer.audio(workspace.id, call_id, chunk(index))
            await producer.client.flush()
            await eventually(lambda: _at_least(metric(server, SHED), before + 5))
        finally:
            server.call(recovered)
        await producer.audio(workspace.id, call_id, chunk(9))
        # In order on one subscription: a chunk let through while late would have come first.
        heard = [pcm async for _, pcm in binary_frames(peer, 1)]
    assert [index_of(pcm) for pcm in heard] == [9]
    assert await metric(server, SHED) == before + 5


async def _at_least(value: Any, expected: int) -> bool:
    return bool(await value >= expected)
