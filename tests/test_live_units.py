"""Pure cores of the streams, without sockets: outbox bounds, the ticker, frames, commands."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from switchboard.live.audio import BUFFER_CHUNKS, CHUNK_BYTES, AudioBuffer, AudioChunk
from switchboard.live.frames import (
    CommandError,
    Ending,
    Listen,
    SendDtmf,
    Terminal,
    Unlisten,
    command_result,
    parse_command,
    sse_data,
)
from switchboard.live.hub import View, encode
from switchboard.live.metrics import Metrics
from switchboard.live.outbox import Outbox
from switchboard.live.ratelimit import TokenBucket
from switchboard.live.registry import StreamRegistry
from tests.harness import eventually


async def test_outbox_drops_the_newest_when_full_and_keeps_terminal_and_replies() -> None:
    drops: list[int] = []
    box = Outbox(3, on_drop=lambda: drops.append(1))
    assert [box.offer(b"%d" % n) for n in range(5)] == [True, True, True, False, False]
    assert box.dropped == 2 and len(drops) == 2 and len(box) == 3
    box.push_priority("reply")
    box.end(Terminal(Ending.CALL_COMPLETED))
    assert not box.offer(b"late")
    items = [await box.next() for _ in range(5)]
    assert items == ["reply", b"0", b"1", b"2", Terminal(Ending.CALL_COMPLETED)]


async def test_end_now_skips_queued_frames_and_wins_over_a_gentle_end() -> None:
    box = Outbox(8)
    box.offer(b"a")
    box.end(Terminal(Ending.CALL_COMPLETED))
    box.end_now(Terminal(Ending.REVOKED))
    assert await box.next() == Terminal(Ending.REVOKED)


async def test_ticker_asks_idle_sse_streams_for_heartbeats_and_ends_expired_tokens() -> None:
    registry = StreamRegistry(Metrics(), heartbeat_interval=30)
    sse, ws, token = Outbox(4), Outbox(4), Outbox(4)
    registry.add(sse, "transcript_sse", "key_a", heartbeats=True)
    registry.add(ws, "call_websocket", "key_a")
    registry.add(token, "transcript_sse", "key_b", expires_at=1000.0, heartbeats=True)
    start = sse.last_write
    registry.tick(start + 10, 999.0)
    assert not sse.heartbeat_due and token.terminal is None
    registry.tick(start + 31, 1000.5)
    assert sse.heartbeat_due and not ws.heartbeat_due
    assert token.terminal == Terminal(Ending.TOKEN_EXPIRED)
    assert await sse.next() is None  # the writer's cue to write `: keep-alive`
    assert registry.end_for_key("key_a") == 2
    assert ws.terminal == Terminal(Ending.REVOKED)
    for box in (sse, ws, token):
        registry.remove(box)
    assert registry.metrics.open_streams["transcript_sse"] == 0


def test_terminals_speak_each_transport() -> None:
    assert (
        Terminal(Ending.CALL_COMPLETED).sse()
        == b'event: end\ndata: {"reason":"call_completed"}\n\n'
    )
    error = Terminal(Ending.DRAINING).sse()
    assert error.startswith(b"event: error\ndata: ") and b'"UNAVAILABLE"' in error
    assert [Terminal(e).websocket_close()[0] for e in Ending] == [
        1000,
        1008,
        1008,
        1012,
        1011,
        1003,
    ]
    assert sse_data("e7", b'{"a":1}') == b'id: e7\ndata: {"a":1}\n\n'


def test_views_encode_once_per_kind() -> None:
    turn = {"role": "user", "text": "hi", "is_final": True, "turn_id": "trn_1", "ts": "t", "x": 1}
    [frame] = encode(View.TRANSCRIPT, turn, "t5")
    assert frame == sse_data(
        "t5", orjson.dumps({k: turn[k] for k in ("role", "text", "is_final", "turn_id", "ts")})
    )
    assert encode(View.TRANSCRIPT, {"role": "user"}, "t6") == []
    completed = {"event_type": "call.completed", "payload": {}}
    assert encode(View.TRANSCRIPT_END, completed, "e1") == [Terminal(Ending.CALL_COMPLETED)]
    assert encode(View.TRANSCRIPT_END, {"event_type": "call.barge_in"}, "e1") == []
    text, end = encode(View.CALL_EVENTS, completed, "evt_1")
    assert isinstance(text, str) and end == Terminal(Ending.CALL_COMPLETED)


def test_command_parser_never_raises() -> None:
    assert parse_command('{"action":"send_dtmf","digits":"12#*AD","request_id":"r1"}') == SendDtmf(
        "12#*AD", "r1"
    )
    for text, request_id in (
        ("", None),
        ("[1]", None),
        ('{"action":"send_dtmf","digits":"1"}', None),
        ('{"action":"send_dtmf","digits":"","request_id":"r"}', "r"),
        ('{"action":"send_dtmf","digits":"' + "1" * 33 + '","request_id":"r"}', "r"),
        ('{"action":"send_dtmf","digits":"E","request_id":"r"}', "r"),
        ('{"action":"hangup","request_id":"r"}', "r"),
        ('{"action":"send_dtmf","digits":1,"request_id":"r"}', "r"),
        # `$` matches before a final newline; the digits must be matched whole.
        ('{"action":"send_dtmf","digits":"12\\n","request_id":"r"}', "r"),
        ('{"action":"send_dtmf","digits":"\\n12","request_id":"r"}', "r"),
    ):
        result = parse_command(text)
        assert isinstance(result, CommandError) and result.request_id == request_id, text
    assert orjson.loads(command_result("r", False, "UNAVAILABLE", "no")) == {
        "event_type": "command.result",
        "request_id": "r",
        "ok": False,
        "error_code": "UNAVAILABLE",
        "message": "no",
    }


async def test_ticker_hangs_up_a_stream_whose_write_waited_two_heartbeat_intervals() -> None:
    registry = StreamRegistry(Metrics(), heartbeat_interval=10)
    hung_up: list[str] = []
    sse, ws, idle = Outbox(4), Outbox(4), Outbox(4)
    registry.add(sse, "transcript_sse", "k", heartbeats=True, hang_up=lambda: hung_up.append("s"))
    registry.add(ws, "call_websocket", "k", hang_up=lambda: hung_up.append("w"))
    registry.add(idle, "call_websocket", "k", hang_up=lambda: hung_up.append("i"))
    start = sse.last_write
    sse.writing_since = ws.writing_since = start
    registry.tick(start + 19.9, 0.0)
    assert hung_up == [] and not sse.aborted
    ws.writing_since = None  # that write finished: the client is reading, slowly
    registry.tick(start + 20.0, 0.0)
    assert hung_up == ["s"] and sse.aborted and not ws.aborted and not idle.aborted
    registry.tick(start + 30.0, 0.0)
    assert hung_up == ["s"]  # once: the stream is unwinding
    assert registry.stalled == {"transcript_sse": 1}
    assert 'switchboard_streams_stalled_total{kind="transcript_sse"} 1' in (
        registry.metrics.render()
    )


def test_token_bucket_allows_a_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=10, burst=20, now=100.0)
    assert [bucket.take(100.0) for _ in range(21)] == [True] * 20 + [False]
    assert bucket.take(100.05) is False  # half a token
    assert [bucket.take(100.25) for _ in range(3)] == [True, True, False]  # 2.5 tokens
    assert [bucket.take(200.0) for _ in range(21)] == [True] * 20 + [False]  # full, not more
    assert bucket.take(150.0) is False  # a clock that went backwards adds nothing


async def test_replies_owed_to_a_client_are_bounded_by_not_reading_its_commands() -> None:
    box = Outbox(2)
    box.push_priority("r1")
    await asyncio.wait_for(box.reply_room(), 1)
    box.push_priority("r2")
    waiting = asyncio.ensure_future(box.reply_room())
    await asyncio.sleep(0)
    assert not waiting.done()  # two replies queued: the reader holds the next command
    assert await box.next() == "r1"
    await asyncio.wait_for(waiting, 1)
    box.push_priority("r3")
    assert box.take_priority() == ["r2", "r3"]
    await asyncio.wait_for(box.reply_room(), 1)
    box.push_priority("r4")
    box.push_priority("r5")
    box.abort()
    await asyncio.wait_for(box.reply_room(), 1)  # an aborted outbox never holds a reader


# --- listening (SPEC 5.3) ----------------------------------------------------------------------


def test_listen_and_unlisten_are_commands() -> None:
    assert parse_command('{"action":"listen","request_id":"r2"}') == Listen("r2")
    assert parse_command('{"action":"unlisten","request_id":"r3"}') == Unlisten("r3")
    for text in ('{"action":"listen"}', '{"action":"listen","request_id":""}'):
        result = parse_command(text)
        assert isinstance(result, CommandError) and result.request_id is None
    assert CHUNK_BYTES == 640 and BUFFER_CHUNKS == 50  # 20 ms of 16 kHz s16le; one second


def test_audio_buffer_is_bounded_and_loses_the_oldest() -> None:
    drops: list[int] = []
    buffer = AudioBuffer(3, on_drop=lambda: drops.append(1))
    chunks = [AudioChunk(bytes([n]) * CHUNK_BYTES) for n in range(5)]
    for chunk in chunks:
        buffer.push(chunk)
    assert len(buffer) == 3 and buffer.dropped == 2 and len(drops) == 2
    assert [buffer.pop() for _ in range(4)] == [*chunks[2:], None]


async def test_events_replies_and_the_end_go_before_audio_and_audio_needs_a_listen() -> None:
    box = Outbox(4)
    a, b = AudioChunk(b"a" * CHUNK_BYTES), AudioChunk(b"b" * CHUNK_BYTES)
    assert not box.offer_audio(a)  # not listening: nothing is queued
    box.listen(AudioBuffer(2))
    assert box.offer_audio(a) and box.offer_audio(b)
    box.offer("event")
    box.push_priority("reply")
    assert [await box.next(audio=True) for _ in range(4)] == ["reply", "event", a, b]
    # An SSE writer never asks for audio: it would wait here rather than take a chunk.
    box.offer_audio(a)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(box.next(), 0.05)
    # At the end the terminal goes first and the audio still queued is dropped.
    box.offer("last")
    box.end(Terminal(Ending.CALL_COMPLETED))
    assert not box.offer_audio(b)
    assert [await box.next(audio=True) for _ in range(2)] == [
        "last",
        Terminal(Ending.CALL_COMPLETED),
    ]


async def test_unlisten_forgets_queued_audio_and_a_second_listen_keeps_the_buffer() -> None:
    box = Outbox(4)
    first = AudioBuffer()
    box.listen(first)
    box.listen(AudioBuffer())
    assert box.audio is first
    box.offer_audio(AudioChunk(b"a" * CHUNK_BYTES))
    box.unlisten()
    assert box.audio is None and not box.offer_audio(AudioChunk(b"b" * CHUNK_BYTES))
    box.offer("event")
    assert await box.next(audio=True) == "event"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(box.next(audio=True), 0.05)


async def test_a_frame_goes_straight_to_the_socket_only_when_nothing_waits_before_it() -> None:
    written: list[bytes | str] = []
    accepting = True

    def direct(frame: bytes | str) -> bool:
        if accepting:
            written.append(frame)
        return accepting

    outbox = Outbox(4, gap=lambda n, cursor: f"gap {n} {cursor}".encode())
    outbox.direct = direct
    assert outbox.offer(b"a", 1, "t1")  # the writer is not waiting yet: queued
    assert written == [] and len(outbox) == 1
    assert await outbox.next() == b"a"
    waiting = asyncio.ensure_future(outbox.next())
    await asyncio.sleep(0)  # let the writer park in `next` (it is idle now)
    assert outbox.idle
    assert outbox.offer(b"b", 2, "t2") and written == [b"b"] and len(outbox) == 0
    assert outbox.last_cursor == "t2"
    outbox.skip_through = 3
    assert outbox.offer(b"replayed", 3) and written == [b"b"]  # the replay sent it
    accepting = False  # the client is behind: frames queue, in order, behind the first
    assert outbox.offer(b"c", 4)
    accepting = True
    assert outbox.offer(b"d", 5)
    assert written == [b"b"] and len(outbox) == 2
    assert await waiting == b"c"
    assert await outbox.next() == b"d"
    outbox.push_priority(b"reply")  # a reply waiting: nothing overtakes it
    assert outbox.offer(b"e", 6) and written == [b"b"]
    outbox.end(Terminal(Ending.CALL_COMPLETED))
    assert not outbox.offer(b"f", 7)  # after the end, nothing


def test_direct_framing_is_what_the_server_would_have_written() -> None:
    from websockets.frames import Frame as WsFrame
    from websockets.frames import Opcode
    from websockets.streams import StreamReader

    from switchboard.live.direct import http_chunk, websocket_text

    assert http_chunk(b"data: x\n\n") == b"9\r\ndata: x\n\n\r\n"
    for size in (5, 125, 126, 65535, 65536):
        text = "é" * (size // 2) + "x" * (size % 2)
        reader = StreamReader()
        reader.feed_data(websocket_text(text))
        parser = WsFrame.parse(reader.read_exact, mask=False)
        try:
            next(parser)
        except StopIteration as done:
            frame = done.value
        assert frame.opcode is Opcode.TEXT and frame.fin and frame.data == text.encode()


async def test_audio_goes_straight_to_the_socket_only_behind_nothing() -> None:
    sent: list[AudioChunk] = []
    outbox = Outbox(4)
    outbox.direct_audio = lambda chunk: sent.append(chunk) is None
    outbox.listen(AudioBuffer())
    first, second, third = (AudioChunk(bytes([n]) * CHUNK_BYTES) for n in range(3))
    waiting = asyncio.ensure_future(outbox.next(audio=True))
    await asyncio.sleep(0)  # the writer parks: idle, nothing queued
    assert outbox.offer_audio(first) and sent == [first]
    assert outbox.offer(b"event")  # an event waits (no direct path for events here)
    assert outbox.offer_audio(second) and sent == [first]  # so audio waits behind it
    assert await waiting == b"event"
    assert await outbox.next(audio=True) == second
    outbox.unlisten()
    assert not outbox.offer_audio(third) and sent == [first]


def test_binary_framing_is_made_once_per_chunk() -> None:
    from switchboard.live.direct import websocket_binary

    chunk = AudioChunk(b"\x01\x02" * (CHUNK_BYTES // 2))
    wire = websocket_binary(chunk)
    assert wire[:4] == bytes((0x82, 126)) + CHUNK_BYTES.to_bytes(2, "big")
    assert wire[4:] == chunk.pcm
    assert websocket_binary(chunk) is wire


def test_audio_is_shed_while_the_loop_runs_late_and_not_before() -> None:
    from switchboard.live.lag import RESUME_BELOW, SHED_ABOVE, SUSTAINED, LoopLag

    late = SHED_ABOVE + 0.001
    assert not LoopLag.observe(False, late, 1)  # one stall is not overload
    assert not LoopLag.observe(False, late, SUSTAINED - 1)
    assert LoopLag.observe(False, late, SUSTAINED)
    assert LoopLag.observe(True, RESUME_BELOW + 0.001, 0)  # still shedding until punctual
    assert not LoopLag.observe(True, RESUME_BELOW - 0.001, 0)


async def test_the_lag_sampler_runs_only_while_its_answer_is_wanted() -> None:
    """Fifty wake-ups a second cost an idle process more than anything else it does: the
    sampler starts when the hub asks (audio is flowing) and stops once nobody has asked."""
    from switchboard.live.lag import LoopLag

    lag = LoopLag(idle_after=0.2)
    lag.start()
    assert not lag.sampling
    assert lag.lagging is False and lag.sampling
    await eventually(lambda: not lag.sampling, within=5.0)
    assert lag.lagging is False  # asked again: sampling anew, punctual until shown otherwise
    assert lag.sampling
    lag.stop()
    assert not lag.sampling and not lag.lagging


async def test_a_catch_up_that_cannot_read_the_history_sends_every_watcher_a_gap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a test of NATS: the hub's answer when its read-back fails (the bus slow or down)."""
    from typing import Any

    from nats.aio.msg import Msg

    from switchboard.live import hub as hub_module
    from switchboard.live.hub import Hub, Topic
    from switchboard.outage import BusUnavailable

    def unreadable(*args: Any, **kwargs: Any) -> Any:
        raise BusUnavailable("the history did not answer")

    monkeypatch.setattr(hub_module, "stored_after", unreadable)
    metrics = Metrics()
    hub = Hub(None, metrics)  # type: ignore[arg-type]
    subject = "vb.ws_1.call.call_1.transcript"
    topic = Topic(subject, "ws_1")
    outbox = Outbox(8, gap=lambda n, cursor: f"gap {n} {cursor}".encode())
    topic.watchers[View.TRANSCRIPT] = {outbox}
    receive = hub._receiver(topic)

    def turn_message(seq: int, previous: int) -> Msg:
        body = {"role": "user", "text": f"t{seq}", "is_final": True, "turn_id": "trn_1", "ts": "x"}
        headers = {
            "Nats-Stream": "VB_TRANSCRIPTS",
            "Nats-Sequence": str(seq),
            "Nats-Last-Sequence": str(previous),
        }
        return Msg(None, subject="live." + subject, data=orjson.dumps(body), headers=headers)  # type: ignore[arg-type]

    await receive(turn_message(5, 0))
    await receive(turn_message(9, 7))  # 7 was never received, and cannot be read back
    frames = [await outbox.next() for _ in range(3)]
    assert b"t5" in frames[0]  # type: ignore[operator]
    assert frames[1] == b"gap 1 t5"  # resume from the last frame the client got
    assert b"t9" in frames[2]  # type: ignore[operator]
    assert metrics.counter("switchboard_live_catch_up_failed_total", "", "stream") == {
        "VB_TRANSCRIPTS": 1
    }
