"""The producer API, for the media plane and the messaging service: publish transcript turns
and catalogue events with valid envelopes. Everything is checked against SPEC section 4 before
it goes on the bus; what does not fit raises EventError with a message that says why.

    producer = Producer(nats_client)
    await producer.turn(ws, call, role="user", text="Hello", is_final=False, turn_id=t)
    await producer.event("call.barge_in", workspace_id=ws, call_id=call,
                         payload={"turn_id": t, "interrupted_text": "I was"})
    await producer.audio(ws, call, pcm)  # every 20 ms: 640 bytes of 16 kHz mono s16le
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from nats.aio.client import Client

from switchboard.bus.connection import PUBLISH_TIMEOUT, store_envelope
from switchboard.events import (
    EventError,
    call_audio_subject,
    call_transcript_subject,
    check_envelope,
    is_voice,
    make_envelope,
)
from switchboard.ids import BASE62, is_id, iso_ms, new_id, utc_now
from switchboard.live.audio import CHUNK_BYTES, CHUNK_MS, SAMPLE_RATE

ROLES = ("user", "agent")


def transcription_event_id(turn_id: str) -> str:
    """The event id of a final turn's `call.transcription`: the same for every retry."""
    body = turn_id.removeprefix("trn_")
    if is_id(f"evt_{body}", "evt"):
        return f"evt_{body}"
    digest = int.from_bytes(hashlib.sha256(turn_id.encode()).digest()[:16], "big")
    chars = []
    for _ in range(22):
        digest, index = divmod(digest, 62)
        chars.append(BASE62[index])
    return "evt_" + "".join(chars)


class Producer:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.js = client.jetstream()

    async def event(
        self,
        event_type: str,
        *,
        workspace_id: str,
        payload: dict[str, Any],
        call_id: str | None = None,
        conversation_id: str | None = None,
        channel: str | None = None,
        agent_id: str | None = None,
        timestamp: str | None = None,
        event_id: str | None = None,
    ) -> dict[str, Any]:
        """Builds, checks and stores an envelope in JetStream (deduplicated on its event_id,
        which a caller that retries should fix); returns it. Raises EventError for anything
        outside the catalogue."""
        if channel is None:
            channel = "voice" if is_voice(event_type) else None
        if channel is None:
            raise EventError(f"{event_type} needs a channel: 'sms' or 'whatsapp'")
        envelope = make_envelope(
            event_type,
            workspace_id=workspace_id,
            payload=payload,
            channel=channel,
            call_id=call_id,
            conversation_id=conversation_id,
            agent_id=agent_id,
            timestamp=timestamp,
            event_id=event_id,
        )
        await self.publish_envelope(envelope)
        return envelope

    async def publish_envelope(self, envelope: dict[str, Any]) -> None:
        """Stores a ready-made envelope after checking it against the catalogue."""
        check_envelope(envelope)
        await store_envelope(self.js, envelope)

    async def turn(
        self,
        workspace_id: str,
        call_id: str,
        *,
        role: str,
        text: str,
        is_final: bool,
        turn_id: str,
        agent_id: str | None = None,
    ) -> None:
        """A transcript turn, partial or final, for the live transcript; a final turn is also
        recorded as `call.transcription` (durable, for webhooks and the call's record).

        A final turn is stored with an acknowledgement, deduplicated on its `turn_id`, and its
        `call.transcription` takes an event id made from the turn id: a caller that got an
        error calls again with the same `turn_id`, and nothing is stored twice. (A plain publish
        while a clustered stream elects a leader is lost without anyone knowing.) Partials stay
        fire-and-forget: the next one replaces them."""
        if role not in ROLES:
            raise EventError(f"role must be one of {', '.join(ROLES)}")
        if not turn_id or not isinstance(text, str):
            raise EventError("a turn needs a turn_id and a text")
        ts = iso_ms(utc_now())
        turn = {"role": role, "text": text, "is_final": is_final, "turn_id": turn_id, "ts": ts}
        subject = call_transcript_subject(workspace_id, call_id)
        if not is_final:
            await self.client.publish(subject, orjson.dumps(turn))
            return
        await self.js.publish(
            subject,
            orjson.dumps(turn),
            timeout=PUBLISH_TIMEOUT,
            headers={"Nats-Msg-Id": f"{turn_id}.final"},
        )
        await self.event(
            "call.transcription",
            workspace_id=workspace_id,
            call_id=call_id,
            agent_id=agent_id,
            payload={"turn_id": turn_id, "role": role, "text": text},
            timestamp=ts,
            event_id=transcription_event_id(turn_id),
        )

    async def audio(self, workspace_id: str, call_id: str, pcm: bytes) -> None:
        """One 20 ms chunk of the call's mixed audio (caller and agent): 16 kHz mono signed
        16-bit little-endian PCM, exactly 640 bytes. Publish one every 20 ms, in order, as the
        audio happens; it is live only (core NATS, never stored), and listeners get it as is."""
        if not isinstance(pcm, bytes | bytearray | memoryview):
            raise EventError("an audio chunk is bytes of PCM")
        chunk = bytes(pcm)
        if len(chunk) != CHUNK_BYTES:
            raise EventError(
                f"an audio chunk is {CHUNK_MS} ms of {SAMPLE_RATE} Hz mono 16-bit PCM, "
                f"{CHUNK_BYTES} bytes; this one is {len(chunk)}"
            )
        await self.client.publish(call_audio_subject(workspace_id, call_id), chunk)

    @staticmethod
    def new_turn_id() -> str:
        return new_id("trn")
