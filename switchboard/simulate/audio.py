"""The pure part of the simulator's sound: reading what the speech engine writes, resampling it
to the bus format (SPEC 5.3: 16 kHz mono signed 16-bit little-endian, 20 ms a chunk), mixing the
two speakers of a call into one chunk at a time, and when each chunk is due. No I/O, no clock:
the runner brings both."""

from __future__ import annotations

import math
import struct
import sys
from array import array
from collections.abc import Sequence
from functools import cache
from operator import mul

from switchboard.live.audio import CHUNK_BYTES, CHUNK_MS, SAMPLE_RATE

RATE = SAMPLE_RATE  # samples a second on the bus
CHUNK_SECONDS = CHUNK_MS / 1000
CHUNK_SAMPLES = CHUNK_BYTES // 2  # 320
SILENCE = bytes(CHUNK_BYTES)
# At most this many overdue chunks go out at once after the clock was held up (one second, what
# the gateway keeps for a listener); older ones are skipped, so a listener is never further
# behind than that because of the simulator.
MAX_BURST = 50

_BIG_ENDIAN = sys.byteorder == "big"


class AudioFormatError(ValueError):
    """Bytes that are not the WAV the speech engine was expected to write."""


# --- the engine's output -------------------------------------------------------------------


def wav_samples(data: bytes) -> tuple[int, array[int]]:
    """(sample rate, samples) of a mono 16-bit PCM WAV file. A WAV written to a pipe cannot go
    back to fill in its lengths (espeak-ng writes 0x7ffff000), so the data runs to the end of
    what was written, whatever its header says."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioFormatError("not a RIFF/WAVE file")
    at = 12
    rate: int | None = None
    while at + 8 <= len(data):
        name, size = data[at : at + 4], struct.unpack_from("<I", data, at + 4)[0]
        body = data[at + 8 : at + 8 + size]
        if name == b"fmt ":
            if len(body) < 16:
                raise AudioFormatError("a WAV fmt chunk shorter than 16 bytes")
            encoding, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
            if (encoding, channels, bits) != (1, 1, 16):
                raise AudioFormatError(
                    f"WAV is encoding {encoding}, {channels} channels, {bits} bits: "
                    "expected PCM (1), mono, 16 bits"
                )
        elif name == b"data":
            if rate is None:
                raise AudioFormatError("WAV data before its fmt chunk")
            samples = array("h")
            samples.frombytes(body[: len(body) - len(body) % 2])
            if _BIG_ENDIAN:
                samples.byteswap()
            return rate, samples
        at += 8 + size + size % 2  # chunks are padded to an even length
    raise AudioFormatError("WAV without a data chunk")


# --- resampling ----------------------------------------------------------------------------

ZERO_CROSSINGS = 16  # of the sinc on each side of a sample: the filter's length
ROLL_OFF = 0.85  # the cutoff, as a fraction of the lower Nyquist frequency


@cache
def _phases(up: int, down: int) -> tuple[int, tuple[tuple[float, ...], ...]]:
    """A polyphase low-pass filter for resampling by up/down: `half` input samples on each
    side, and for each of the `up` fractional positions an output can fall on, the weights of
    the 2 * half input samples around it (a Blackman-windowed sinc, scaled to unit gain at 0 Hz
    so silence stays silence and a level stays a level)."""
    cutoff = min(1.0, up / down) * ROLL_OFF  # as a fraction of the input's Nyquist frequency
    half = math.ceil(ZERO_CROSSINGS / cutoff)
    phases = []
    for phase in range(up):
        frac = phase / up
        weights = []
        for m in range(2 * half):
            # Input sample i - half + 1 + m, seen from the output's position i + frac.
            d = half - 1 - m + frac
            x = d / half
            window = 0.42 + 0.5 * math.cos(math.pi * x) + 0.08 * math.cos(2 * math.pi * x)
            arg = math.pi * cutoff * d
            weights.append(window * (1.0 if arg == 0 else math.sin(arg) / arg))
        total = sum(weights)
        phases.append(tuple(w / total for w in weights))
    return half, tuple(phases)


def resample(samples: Sequence[int], from_rate: int, to_rate: int) -> array[int]:
    """Band-limited resampling of 16-bit samples (windowed-sinc, polyphase): what is above the
    lower of the two Nyquist frequencies is filtered out rather than folded back into speech."""
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError("sample rates must be positive")
    if from_rate == to_rate:
        return array("h", samples)
    common = math.gcd(from_rate, to_rate)
    up, down = to_rate // common, from_rate // common
    half, phases = _phases(up, down)
    padded = [0.0] * half + [float(s) for s in samples] + [0.0] * half
    out = array("h", bytes(2 * ((len(samples) * up) // down)))
    for n in range(len(out)):
        i, phase = divmod(n * down, up)
        # Input sample j sits at padded[j + half]; the filter spans j = i - half + 1 .. i + half.
        value = sum(map(mul, phases[phase], padded[i + 1 : i + 1 + 2 * half]))
        out[n] = max(-32768, min(32767, round(value)))
    return out


# --- chunks and mixing ---------------------------------------------------------------------


def to_bytes(samples: array[int]) -> bytes:
    """Signed 16-bit little-endian, whatever the machine's byte order."""
    if _BIG_ENDIAN:
        samples = array("h", samples)
        samples.byteswap()
    return samples.tobytes()


def chunks(samples: array[int]) -> list[bytes]:
    """The samples as 20 ms chunks of 640 bytes, the last one filled out with silence."""
    pcm = to_bytes(samples)
    pcm += bytes(-len(pcm) % CHUNK_BYTES)
    return [pcm[at : at + CHUNK_BYTES] for at in range(0, len(pcm), CHUNK_BYTES)]


class Mixer:
    """A call's sound, 20 ms at a time: the sum of every voice playing now (the caller and the
    agent may talk over each other), clipped to 16 bits; silence when nobody speaks."""

    def __init__(self) -> None:
        self._voices: dict[str, tuple[array[int], int]] = {}  # key -> (samples, next position)

    @property
    def speaking(self) -> bool:
        return bool(self._voices)

    def add(self, key: str, samples: array[int]) -> None:
        """Starts playing `samples` from the next chunk on."""
        if samples:
            self._voices[key] = (samples, 0)

    def cut(self, key: str) -> None:
        """Stops a voice mid-way (a barge-in)."""
        self._voices.pop(key, None)

    def next_chunk(self) -> bytes:
        if not self._voices:
            return SILENCE
        parts = []
        for key, (samples, at) in list(self._voices.items()):
            parts.append(samples[at : at + CHUNK_SAMPLES])
            if at + CHUNK_SAMPLES >= len(samples):
                del self._voices[key]
            else:
                self._voices[key] = (samples, at + CHUNK_SAMPLES)
        if len(parts) == 1:
            mixed = parts[0]
        else:
            mixed = array("h", bytes(2 * max(len(part) for part in parts)))
            for part in parts:
                for n, sample in enumerate(part):
                    mixed[n] = max(-32768, min(32767, mixed[n] + sample))
        if len(mixed) < CHUNK_SAMPLES:
            mixed = mixed + array("h", bytes(2 * (CHUNK_SAMPLES - len(mixed))))
        return to_bytes(mixed)


# --- pacing --------------------------------------------------------------------------------


def chunk_time(start: float, k: int) -> float:
    """When chunk k is due: counted from the start, so lateness never adds up into drift."""
    return start + k * CHUNK_SECONDS


def due_chunks(start: float, sent: int, now: float) -> tuple[int, int]:
    """(to skip, to send) at `now`, when `sent` chunks have gone since `start`: every chunk whose
    time has come goes out, but never more than MAX_BURST at once (the oldest are skipped)."""
    # The tolerance keeps a wake-up at exactly chunk_time(start, k) from counting as early.
    due = math.floor((now - start) / CHUNK_SECONDS + 1e-6) + 1 - sent
    if due <= 0:
        return 0, 0
    return max(0, due - MAX_BURST), min(due, MAX_BURST)
