"""Issue 12: the simulator's sound. The pure parts (reading the engine's WAV, resampling,
chunks, mixing, the pacing schedule) without I/O; then the simulator on the real NATS, speaking
a known sentence through espeak-ng into the call's `.audio` subject, and carrying on without
sound when espeak-ng is not there."""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import shutil
import struct
from array import array
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from switchboard.simulate import SimulationPlan, Simulator
from switchboard.simulate.audio import (
    CHUNK_BYTES,
    CHUNK_SAMPLES,
    MAX_BURST,
    SILENCE,
    AudioFormatError,
    Mixer,
    chunk_time,
    chunks,
    due_chunks,
    resample,
    wav_samples,
)
from switchboard.simulate.script import Step, call_script, spoken_turns
from switchboard.simulate.speech import Speech
from tests.harness import Workspace

HAVE_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(
    not HAVE_ESPEAK and not os.environ.get("SWITCHBOARD_REQUIRE_ESPEAK"),
    reason="espeak-ng is not installed (apt-get install espeak-ng; .ci/run does)",
)


def sine(frequency: float, rate: int, seconds: float, amplitude: float) -> array[int]:
    return array(
        "h",
        (
            round(amplitude * math.sin(2 * math.pi * frequency * n / rate))
            for n in range(int(rate * seconds))
        ),
    )


def rms(samples: array[int] | list[int]) -> float:
    return math.sqrt(sum(s * s for s in samples) / len(samples)) if samples else 0.0


def power_at(samples: array[int], frequency: float, rate: int) -> float:
    """The amplitude of one frequency in the samples (a single DFT bin, Goertzel-style)."""
    w = 2 * math.pi * frequency / rate
    re = sum(s * math.cos(w * n) for n, s in enumerate(samples))
    im = sum(s * math.sin(w * n) for n, s in enumerate(samples))
    return 2 * math.hypot(re, im) / len(samples)


def pcm(chunk: bytes) -> array[int]:
    samples = array("h")
    samples.frombytes(chunk)
    return samples  # the tests run on little-endian machines, as the bus format is


# --- pure parts ----------------------------------------------------------------------------


def test_resampling_a_sine_keeps_its_frequency_and_its_level() -> None:
    tone = sine(1000, 22050, 1.0, 10000)
    out = resample(tone, 22050, 16000)
    assert len(out) == 16000
    steady = out[400:-400]  # away from the filter's run-in at the edges
    assert rms(steady) == pytest.approx(10000 / math.sqrt(2), rel=0.01)
    # All of it is still at 1 kHz: the bin there holds the whole amplitude, its neighbours none.
    assert power_at(steady, 1000, 16000) == pytest.approx(10000, rel=0.01)
    assert power_at(steady, 1100, 16000) < 100
    crossings = sum(1 for a, b in itertools.pairwise(steady) if (a < 0) != (b < 0))
    assert crossings == pytest.approx(2 * 1000 * len(steady) / 16000, abs=2)


def test_resampling_removes_what_the_new_rate_cannot_carry_instead_of_folding_it() -> None:
    # 10 kHz is above 16 kHz's Nyquist frequency: a naive resampler folds it to 6 kHz.
    out = resample(sine(10000, 22050, 0.5, 10000), 22050, 16000)[400:-400]
    assert rms(out) < 10  # over 57 dB down
    assert power_at(out, 6000, 16000) < 10
    # And upsampling keeps a level too.
    up = resample(sine(440, 8000, 0.5, 8000), 8000, 16000)[400:-400]
    assert rms(up) == pytest.approx(8000 / math.sqrt(2), rel=0.01)
    assert resample(array("h", [0] * 441), 22050, 16000) == array("h", [0] * 320)


def wav(rate: int, samples: list[int], *, channels: int = 1, sizes: int | None = None) -> bytes:
    """A WAV file as espeak-ng writes one to a pipe: lengths it could not go back to fill in."""
    data = struct.pack(f"<{len(samples)}h", *samples)
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * 2 * channels, 2 * channels, 16)
    riff = sizes if sizes is not None else 36 + len(data)
    data_size = sizes if sizes is not None else len(data)
    return (
        b"RIFF"
        + struct.pack("<I", riff)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", data_size)
        + data
    )


def test_the_engines_wav_is_read_whatever_lengths_its_header_claims() -> None:
    assert wav_samples(wav(22050, [1, -2, 3])) == (22050, array("h", [1, -2, 3]))
    assert wav_samples(wav(22050, [1, -2, 3], sizes=0x7FFFF000)) == (22050, array("h", [1, -2, 3]))
    with pytest.raises(AudioFormatError, match="mono"):
        wav_samples(wav(22050, [1, 2], channels=2))
    with pytest.raises(AudioFormatError):
        wav_samples(b"not a wav file at all")


def test_chunks_are_640_bytes_of_little_endian_pcm_the_last_filled_with_silence() -> None:
    samples = array("h", range(-500, 500))  # 1000 samples: 3 chunks and 40 samples over
    out = chunks(samples)
    assert [len(c) for c in out] == [CHUNK_BYTES] * 4
    assert out[0][:4] == struct.pack("<hh", -500, -499)
    assert pcm(b"".join(out))[:1000] == samples
    assert out[3][80:] == bytes(CHUNK_BYTES - 80)
    assert chunks(array("h")) == []


def test_the_mixer_gives_silence_one_voice_or_both_summed_and_clipped() -> None:
    mixer = Mixer()
    assert mixer.next_chunk() == SILENCE and not mixer.speaking
    mixer.add("a", array("h", [1000] * (CHUNK_SAMPLES + 10)))
    assert pcm(mixer.next_chunk()) == array("h", [1000] * CHUNK_SAMPLES)
    mixer.add("b", array("h", [32000] * 5))  # talks over the rest of "a"
    second = pcm(mixer.next_chunk())
    assert list(second[:5]) == [32767] * 5  # clipped, not wrapped around
    assert list(second[5:10]) == [1000] * 5 and list(second[10:]) == [0] * (CHUNK_SAMPLES - 10)
    assert not mixer.speaking and mixer.next_chunk() == SILENCE
    mixer.add("c", array("h", [7] * 1000))
    mixer.cut("c")  # a barge-in
    assert mixer.next_chunk() == SILENCE


def test_the_pacing_schedule_sends_chunk_k_at_start_plus_k_times_20_ms_without_drift() -> None:
    start = 1234.5
    assert due_chunks(start, 0, start - 0.001) == (0, 0)
    assert due_chunks(start, 0, start) == (0, 1)  # the first chunk goes at once
    assert due_chunks(start, 1, start + 0.019) == (0, 0)
    # A wake-up exactly on time finds one chunk due, however far into the call: the times are
    # counted from the start, never added up, so an hour of 20 ms steps does not drift.
    for k in range(1, 180_000, 997):
        assert due_chunks(start, k, chunk_time(start, k)) == (0, 1)
        assert due_chunks(start, k + 1, chunk_time(start, k + 1) - 0.0001) == (0, 0)
    # Late by 70 ms: the chunks due meanwhile go out together, and the next is on the old beat.
    assert due_chunks(start, 10, chunk_time(start, 10) + 0.07) == (0, 4)
    assert chunk_time(start, 14) - chunk_time(start, 10) == pytest.approx(0.08)
    # Held up for 3 s: one second's worth goes out, the older chunks are skipped.
    assert due_chunks(start, 10, chunk_time(start, 10) + 3.0) == (150 - MAX_BURST + 1, MAX_BURST)


def test_a_turn_says_its_final_text_and_a_cut_turn_says_what_was_said() -> None:
    steps = call_script(random.Random(4), transport="sip", exchanges=6)
    spoken = spoken_turns(steps)
    finals = {s.data["turn_id"]: s.data["text"] for s in steps if s.data.get("is_final")}
    assert spoken == {t: (spoken[t][0], text) for t, text in finals.items()}
    assert {role for role, _ in spoken.values()} == {"user", "agent"}
    partial_only = [Step(0.1, "turn", {"role": "user", "text": "Hi", "turn_id": "t"})]
    assert spoken_turns(partial_only) == {"t": ("user", "Hi")}


@needs_espeak
async def test_the_two_roles_speak_in_different_voices() -> None:
    speech = Speech()
    user = await speech.render("user", "Hello there")
    agent = await speech.render("agent", "Hello there")
    assert user is not None and agent is not None
    assert rms(user) > 1000 and rms(agent) > 1000
    assert user != agent
    assert await speech.render("user", "Hello there") is user  # kept per text


# --- the simulator on the bus --------------------------------------------------------------

SENTENCE = "The quick brown fox jumps over the lazy dog"
REPLY = "Thank you"
GAP = 3.5  # seconds from the user's final to the agent's turn: ample silence after the speech


def known_script(rng: random.Random, *, transport: str) -> list[Step]:
    """A user says SENTENCE, a long pause, the agent says REPLY, the call ends."""
    return [
        Step(0.2, "turn", {"role": "user", "text": "The quick", "is_final": False, "turn_id": "u"}),
        Step(0.3, "turn", {"role": "user", "text": SENTENCE, "is_final": True, "turn_id": "u"}),
        Step(GAP, "turn", {"role": "agent", "text": REPLY, "is_final": True, "turn_id": "a"}),
        Step(
            1.5,
            "event",
            {
                "event_type": "call.completed",
                "payload": {"status": "completed", "duration_seconds": 5.5, "ended_by": "user"},
            },
        ),
    ]


def short_script(rng: random.Random, *, transport: str) -> list[Step]:
    return [
        Step(0.1, "turn", {"role": "user", "text": "Hello", "is_final": True, "turn_id": "u"}),
        Step(
            0.1,
            "event",
            {
                "event_type": "call.completed",
                "payload": {"status": "completed", "duration_seconds": 0.2, "ended_by": "user"},
            },
        ),
    ]


@pytest.fixture
async def listener(nats_url: str) -> AsyncIterator[Client]:
    """The test's own NATS connection, as a gateway's would be."""
    connection = await nats.connect(nats_url)
    yield connection
    await connection.close()


async def record_calls(listener: Client, workspace_id: str) -> list[tuple[str, Any]]:
    """Every audio chunk, transcript turn and event of the workspace's calls, in the order they
    were published: one subscription, so their order is the publisher's."""
    seen: list[tuple[str, Any]] = []

    async def note(msg: Msg) -> None:
        kind = msg.subject.rsplit(".", 1)[1]
        seen.append((kind, msg.data if kind == "audio" else orjson.loads(msg.data)))

    await listener.subscribe(f"vb.{workspace_id}.call.*.*", cb=note)
    await listener.flush()
    return seen


def index_of(seen: list[tuple[str, Any]], match: Callable[[str, Any], bool]) -> int:
    return next(n for n, (kind, body) in enumerate(seen) if match(kind, body))


@pytest.mark.slow
@needs_espeak
async def test_the_simulator_speaks_a_known_sentence_on_the_calls_audio_subject(
    workspace: Workspace, bus: Client, listener: Client
) -> None:
    seen = await record_calls(listener, workspace.id)
    plan = SimulationPlan(workspace.id, calls=1, conversations=0, seed=5)
    simulator = Simulator(bus, plan, script=known_script)
    await simulator.start()
    try:
        await simulator.wait()
    finally:
        await simulator.stop()
    await listener.flush()
    assert len(simulator.finished_calls) == 1

    audio = [body for kind, body in seen if kind == "audio"]
    assert audio and all(len(chunk) == CHUNK_BYTES for chunk in audio)
    said = index_of(seen, lambda k, b: k == "transcript" and b["turn_id"] == "u")
    replied = index_of(seen, lambda k, b: k == "transcript" and b["turn_id"] == "a")
    ended = index_of(seen, lambda k, b: k == "events" and b["event_type"] == "call.completed")

    def chunks_between(first: int, last: int) -> list[bytes]:
        return [body for kind, body in seen[first:last] if kind == "audio"]

    # Silence before anyone speaks; the call's sound is all out before its end.
    before = chunks_between(0, said)
    assert before and all(chunk == SILENCE for chunk in before)
    assert all(kind != "audio" for kind, _ in seen[ended:])

    # Real time: 20 ms a chunk from the user's first partial to the agent's turn (0.3 s + GAP).
    turn = chunks_between(said, replied)
    assert len(turn) == pytest.approx((0.3 + GAP) / 0.02, abs=10)
    # The sentence: loud at once (the line was rendered while the call began), for well over a
    # second; and exact silence for the last second before the agent speaks.
    levels = [rms(pcm(chunk)) for chunk in turn]
    assert max(levels[:10]) > 1000
    loud = [level for level in levels if level > 300]
    assert len(loud) > 75  # 1.5 s of the ~2.8 s the engine takes to say it
    assert rms([round(level) for level in loud]) > 1500
    assert all(chunk == SILENCE for chunk in turn[-50:])
    # The agent's reply is heard too, in another voice, then silence again until the end.
    reply = [rms(pcm(chunk)) for chunk in chunks_between(replied, ended)]
    assert sum(level > 300 for level in reply) > 10
    assert reply[-1] == 0


async def test_without_espeak_the_simulator_says_so_once_and_plays_on_silently(
    workspace: Workspace,
    bus: Client,
    listener: Client,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen = await record_calls(listener, workspace.id)
    plan = SimulationPlan(workspace.id, calls=2, conversations=0, seed=8)
    missing = Speech(binary=tmp_path / "espeak-ng")  # nothing there
    simulator = Simulator(bus, plan, speech=missing, script=short_script)
    with caplog.at_level(logging.INFO, logger="switchboard.simulate"):
        await simulator.start()
        try:
            await simulator.wait()
        finally:
            await simulator.stop()
    await listener.flush()
    told = [r for r in caplog.records if "no audio" in r.getMessage()]
    assert len(told) == 1 and "espeak-ng" in told[0].getMessage()
    assert told[0].levelno == logging.WARNING
    assert len(simulator.finished_calls) == 2
    finals = [body for kind, body in seen if kind == "transcript" and body["is_final"]]
    assert len(finals) == 2
    assert [kind for kind, _ in seen if kind == "audio"] == []
