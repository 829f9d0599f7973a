"""The simulator's voices: a turn's text rendered to speech by espeak-ng (a real engine, run as a
subprocess off the event loop), one voice per role, resampled to the bus format and kept per
text, since a script says the same lines again and again."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from array import array
from pathlib import Path

from switchboard.simulate.audio import RATE, AudioFormatError, resample, wav_samples

log = logging.getLogger(__name__)

ENGINE = "espeak-ng"
# The caller and the agent must not sound alike: a British man calls, an American woman answers.
VOICES = {"user": "en-gb+m3", "agent": "en-us+f3"}
SPEED = 175  # words a minute: espeak-ng's default, about the pace of the scripts' partials
RENDER_TIMEOUT = 10.0  # seconds; a line takes a few milliseconds
CACHE_SIZE = 256  # lines kept; the scripts have a few dozen


class Speech:
    """Renders text with espeak-ng, found on the PATH unless `binary` says where it is; a
    missing or unusable binary makes it `available` False, and a simulator then plays no
    audio."""

    def __init__(
        self,
        binary: str | os.PathLike[str] | None = None,
        *,
        voices: dict[str, str] | None = None,
        speed: int = SPEED,
    ) -> None:
        path = shutil.which(ENGINE) if binary is None else os.fspath(binary)
        usable = path is not None and Path(path).is_file() and os.access(path, os.X_OK)
        self.binary = path if usable else None
        self.voices = dict(VOICES if voices is None else voices)
        self.speed = speed
        self._done: dict[tuple[str, str], array[int] | None] = {}
        self._pending: dict[tuple[str, str], asyncio.Task[array[int] | None]] = {}
        # One line at a time: resampling is pure Python, and a process that also serves streams
        # (serve --demo) should not have several threads contending for its interpreter.
        self._one_at_a_time = asyncio.Semaphore(1)
        self._failure_told = False

    @property
    def available(self) -> bool:
        return self.binary is not None

    async def render(self, role: str, text: str) -> array[int] | None:
        """16 kHz samples of `text` in `role`'s voice, or None if it cannot be said (no engine,
        or the engine failed: said once in the log, and the turn is silent)."""
        key = (role, text)
        if key in self._done:
            return self._done[key]
        # Shielded: a call that hangs up does not cancel a line another call is waiting for.
        return await asyncio.shield(self._task(key))

    def prefetch(self, role: str, text: str) -> None:
        """Starts rendering a line that will be said soon, so it is ready when it is."""
        if (role, text) not in self._done:
            self._task((role, text))

    async def stop(self) -> None:
        """Abandons the lines still being rendered (what is cached stays)."""
        pending = list(self._pending.values())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _task(self, key: tuple[str, str]) -> asyncio.Task[array[int] | None]:
        task = self._pending.get(key)
        if task is None:  # the same line asked for twice at once is rendered once
            task = self._pending[key] = asyncio.create_task(self._render(*key))
            task.add_done_callback(lambda done: self._finished(key, done))
        return task

    def _finished(self, key: tuple[str, str], task: asyncio.Task[array[int] | None]) -> None:
        self._pending.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return
        if len(self._done) >= CACHE_SIZE:
            self._done.pop(next(iter(self._done)))
        self._done[key] = task.result()

    async def _render(self, role: str, text: str) -> array[int] | None:
        if self.binary is None or not text.strip():
            return None
        async with self._one_at_a_time:
            return await self._engine(role, text)

    async def _engine(self, role: str, text: str) -> array[int] | None:
        assert self.binary is not None
        try:
            # The text goes on stdin, so a line that begins with '-' is never read as an option.
            process = await asyncio.create_subprocess_exec(
                self.binary,
                "-v",
                self.voices.get(role, VOICES["agent"]),
                "-s",
                str(self.speed),
                "-b",
                "1",  # UTF-8
                "--stdout",
                "--stdin",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                async with asyncio.timeout(RENDER_TIMEOUT):
                    wav, errors = await process.communicate(text.encode())
            finally:  # timed out, or cancelled by a stop: leave no process behind
                if process.returncode is None:
                    process.kill()
                    await asyncio.shield(process.wait())
            if process.returncode != 0:
                raise RuntimeError(
                    f"exit status {process.returncode}: {errors.decode(errors='replace').strip()}"
                )
            rate, samples = wav_samples(wav)
            # Some 100 ms of arithmetic for a line: in a thread, so the loop keeps its pace.
            return await asyncio.to_thread(resample, samples, rate, RATE)
        except (OSError, RuntimeError, TimeoutError, AudioFormatError) as failure:
            if not self._failure_told:
                self._failure_told = True
                log.warning(
                    "%s could not render a turn (%s): such turns are silent",
                    ENGINE,
                    str(failure) or type(failure).__name__,
                )
            return None
