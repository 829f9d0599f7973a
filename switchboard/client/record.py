"""`switchboard listen`: what a live call sounds like, written as it is heard to a WAV file
(playable whenever the command stops: the header is brought up to date with every chunk) or as
raw PCM to stdout, for a player reading a pipe. Ends with the call, or with Ctrl-C."""

from __future__ import annotations

import sys
import wave
from collections.abc import Sequence
from typing import BinaryIO, TextIO

from switchboard.client.streams import SwitchboardClient

# SPEC 5.3: 20 ms chunks of signed 16-bit little-endian mono PCM at 16 kHz.
SAMPLE_RATE = 16_000
SAMPLE_WIDTH = 2
CHANNELS = 1
STDOUT = "-"


def open_wav(path: str) -> wave.Wave_write:
    """A WAV file in the format the call socket sends, ready for its chunks as they come."""
    wav = wave.open(path, "wb")  # noqa: SIM115 - closed by the caller, also on Ctrl-C
    wav.setnchannels(CHANNELS)
    wav.setsampwidth(SAMPLE_WIDTH)
    wav.setframerate(SAMPLE_RATE)
    return wav


def seconds_of(pcm_bytes: int) -> float:
    return pcm_bytes / (SAMPLE_RATE * SAMPLE_WIDTH * CHANNELS)


async def record(
    urls: str | Sequence[str],
    key: str,
    call_id: str,
    output: str,
    *,
    stdout: BinaryIO | None = None,
    err: TextIO = sys.stderr,
) -> int:
    """Listens to the call and writes what it hears to `output` (a path, or `-` for raw PCM on
    `stdout`) until the call ends; returns the number of PCM bytes written."""
    written = 0
    wav = None if output == STDOUT else open_wav(output)
    raw = stdout if stdout is not None else sys.stdout.buffer
    where = "stdout" if wav is None else output
    ending = "stopped"
    try:
        async with SwitchboardClient(urls, key) as client:
            err.write(f"-- listening to {call_id}, writing {where} (Ctrl-C stops)\n")
            err.flush()
            async for chunk in client.listen(call_id):
                if wav is None:
                    raw.write(chunk)
                    raw.flush()
                else:
                    # Also rewrites the header's lengths: the file plays if we are killed.
                    wav.writeframes(chunk)
                written += len(chunk)
            ending = "call ended"
    finally:
        if wav is not None:
            wav.close()
        if written or ending == "call ended":
            err.write(f"-- {ending}: {seconds_of(written):.2f} s of audio to {where}\n")
            err.flush()
    return written
