"""The event envelope and catalogue (SPEC section 4) and the bus subjects (SPEC section 7).
Pure: building, checking and addressing events, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from switchboard.ids import iso_ms, new_id, utc_now

CHANNELS: Final = ("voice", "sms", "whatsapp")

# event_type -> payload fields it must carry (it may carry more).
CATALOGUE: Final[dict[str, tuple[str, ...]]] = {
    "call.initiated": ("direction", "from_number", "to_number", "transport"),
    "call.transcription": ("turn_id", "role", "text"),
    "call.agent_response": ("turn_id", "text"),
    "call.barge_in": ("turn_id", "interrupted_text"),
    "call.idle_silence": ("silence_ms", "threshold_ms"),
    "call.quality_degraded": ("metric", "value", "threshold"),
    "call.quality": ("mos", "packet_loss_pct", "jitter_ms", "rtt_ms"),
    "call.dtmf_sent": ("digits", "request_id"),
    "call.completed": ("status", "duration_seconds", "ended_by"),
    "message.received": ("message_id", "direction", "text", "status"),
    "message.sent": ("message_id", "direction", "text", "status"),
    "message.delivered": ("message_id", "direction", "text", "status"),
    "message.read": ("message_id", "direction", "text", "status"),
    "message.failed": ("message_id", "direction", "text", "status"),
    "conversation.mode_changed": ("from_mode", "to_mode", "actor_user_id"),
}


class EventError(ValueError):
    """An event that does not fit the catalogue; the message says which part."""


def is_voice(event_type: str) -> bool:
    return event_type.startswith("call.")


def make_envelope(
    event_type: str,
    *,
    workspace_id: str,
    payload: Mapping[str, Any],
    channel: str,
    call_id: str | None = None,
    conversation_id: str | None = None,
    agent_id: str | None = None,
    event_id: str | None = None,
    timestamp: str | None = None,
) -> dict[str, Any]:
    envelope: dict[str, Any] = {
        "event_id": event_id or new_id("evt"),
        "event_type": event_type,
        "channel": channel,
        "workspace_id": workspace_id,
        "agent_id": agent_id,
    }
    if call_id is not None:
        envelope["call_id"] = call_id
    if conversation_id is not None:
        envelope["conversation_id"] = conversation_id
    envelope["timestamp"] = timestamp or iso_ms(utc_now())
    envelope["payload"] = dict(payload)
    check_envelope(envelope)
    return envelope


def check_envelope(envelope: Mapping[str, Any]) -> None:
    """Raises EventError unless the envelope fits SPEC section 4."""
    event_type = envelope.get("event_type")
    if event_type not in CATALOGUE:
        raise EventError(f"event_type {event_type!r} is not in the catalogue")
    channel = envelope.get("channel")
    if channel not in CHANNELS:
        raise EventError(f"channel must be one of {', '.join(CHANNELS)}")
    if is_voice(event_type):
        if channel != "voice" or not envelope.get("call_id"):
            raise EventError(f"{event_type} needs channel 'voice' and a call_id")
    elif channel == "voice" or not envelope.get("conversation_id"):
        raise EventError(f"{event_type} needs channel 'sms' or 'whatsapp' and a conversation_id")
    for name in ("event_id", "workspace_id", "timestamp"):
        if not isinstance(envelope.get(name), str) or not envelope[name]:
            raise EventError(f"envelope field {name} is missing")
    payload = envelope.get("payload")
    if not isinstance(payload, Mapping):
        raise EventError("payload must be an object")
    missing = [name for name in CATALOGUE[event_type] if name not in payload]
    if missing:
        raise EventError(f"{event_type} payload is missing {', '.join(missing)}")


# --- subjects (SPEC section 7) ---------------------------------------------------------------

EVENTS_STREAM: Final = "VB_EVENTS"
EVENTS_SUBJECTS: Final = ("vb.*.call.*.events", "vb.*.conversation.*.events")
# Every transcript turn, partial and final, kept for the history window: the cursors of the
# transcript stream are its sequence numbers (SPEC 5.4).
TRANSCRIPTS_STREAM: Final = "VB_TRANSCRIPTS"
TRANSCRIPT_SUBJECTS: Final = ("vb.*.call.*.transcript",)
# JetStream republishes every stored message here, with its stream and sequence in headers:
# the live hub's subscriptions, so a live frame carries the same cursor as its stored copy.
LIVE_PREFIX: Final = "live."
# Switchboard's own coordination between replicas; not part of the producer contract.
KEY_REVOKED_SUBJECT: Final = "switchboard.internal.keys.revoked"


def live_subject(subject: str) -> str:
    """Where JetStream republishes what it stores on `subject` (wildcards allowed)."""
    return LIVE_PREFIX + subject


def workspace_events_subject(workspace_id: str) -> str:
    """Every `.events` subject of one workspace (a filter; SPEC 5.5)."""
    return f"vb.{workspace_id}.*.*.events"


def call_events_subject(workspace_id: str, call_id: str) -> str:
    return f"vb.{workspace_id}.call.{call_id}.events"


def call_transcript_subject(workspace_id: str, call_id: str) -> str:
    return f"vb.{workspace_id}.call.{call_id}.transcript"


def call_control_subject(workspace_id: str, call_id: str) -> str:
    return f"vb.{workspace_id}.call.{call_id}.control"


def call_audio_subject(workspace_id: str, call_id: str) -> str:
    """20 ms chunks of the call's mixed audio (SPEC 5.3's format): core NATS only, never stored,
    so no stream's subjects may match it."""
    return f"vb.{workspace_id}.call.{call_id}.audio"


def conversation_events_subject(workspace_id: str, conversation_id: str) -> str:
    return f"vb.{workspace_id}.conversation.{conversation_id}.events"


def parse_events_subject(subject: str) -> tuple[str, str, str] | None:
    """(workspace_id, "call" or "conversation", id) of a `.events` subject, else None."""
    parts = subject.split(".")
    shaped = len(parts) == 5 and parts[0] == "vb" and parts[4] == "events"
    if shaped and parts[2] in ("call", "conversation"):
        return parts[1], parts[2], parts[3]
    return None


def subject_mismatch(subject: str, envelope: Mapping[str, Any]) -> str | None:
    """Why an envelope does not belong on `subject` (SPEC 7: a consumer trusts the workspace in
    the subject, never the one inside a message), or None when it does."""
    parsed = parse_events_subject(subject)
    if parsed is None:
        return "not an .events subject"
    workspace_id, kind, ident = parsed
    if envelope.get("workspace_id") != workspace_id:
        return "workspace_id differs from the subject's"
    if envelope.get("call_id" if kind == "call" else "conversation_id") != ident:
        return f"{kind} id differs from the subject's"
    return None


def subject_for(envelope: Mapping[str, Any]) -> str:
    if envelope.get("call_id"):
        return call_events_subject(envelope["workspace_id"], envelope["call_id"])
    return conversation_events_subject(envelope["workspace_id"], envelope["conversation_id"])
