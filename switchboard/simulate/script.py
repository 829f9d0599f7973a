"""Scripts of lifelike calls and conversations, as pure functions of a seeded random source:
a list of timed steps that the runner plays on the bus. Pure, so their rules (no barge-in on
WebRTC, partials that grow word by word, one completion last) are tested without NATS."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from switchboard.ids import BASE62

USER_LINES = (
    "Hi I am calling about my order from last week",
    "It was supposed to arrive on Monday but nothing came",
    "Can you tell me where the package is right now",
    "I would like to change the delivery address please",
    "Yes the new address is twelve Baker Street",
    "That works thank you very much",
)
AGENT_LINES = (
    "Thanks for calling I can help you with that",
    "Let me look up your order one moment please",
    "Your package is at the local depot and will arrive tomorrow",
    "I have updated the delivery address for you",
    "Is there anything else I can help you with today",
    "Have a wonderful day goodbye",
)
INBOUND_TEXTS = (
    "Hi is my appointment still on for Friday",
    "Can I move it to the afternoon",
    "Great thanks",
)
REPLY_TEXTS = (
    "Yes your appointment is confirmed for Friday at 10am",
    "Done: you are now booked for 3pm on Friday",
    "You are welcome see you then",
)


@dataclass(frozen=True)
class Step:
    """Wait `delay` seconds (before pacing), then do it: a transcript turn or a catalogue event."""

    delay: float
    kind: str  # "turn" | "event"
    data: dict[str, Any] = field(default_factory=dict)


def _id(rng: random.Random, prefix: str) -> str:
    return prefix + "_" + "".join(rng.choice(BASE62) for _ in range(22))


def _speak(rng: random.Random, role: str, line: str, turn_id: str) -> list[Step]:
    """Partials growing word by word, then the final."""
    words = line.split()
    steps = [
        Step(
            rng.uniform(0.15, 0.35),
            "turn",
            {"role": role, "text": " ".join(words[:n]), "is_final": False, "turn_id": turn_id},
        )
        for n in range(1, len(words))
    ]
    steps.append(
        Step(
            rng.uniform(0.2, 0.4),
            "turn",
            {"role": role, "text": line, "is_final": True, "turn_id": turn_id},
        )
    )
    return steps


def spoken_turns(steps: list[Step]) -> dict[str, tuple[str, str]]:
    """turn_id -> (role, what the turn says in the end: its final text, or its last partial's),
    so its speech can begin with its first partial."""
    spoken: dict[str, tuple[str, str]] = {}
    for step in steps:
        if step.kind == "turn":
            spoken[step.data["turn_id"]] = (step.data["role"], step.data["text"])
    return spoken


def call_script(rng: random.Random, *, transport: str, exchanges: int | None = None) -> list[Step]:
    """One call after its `call.initiated`: user and agent turns, the odd barge-in (never on
    WebRTC), silence and quality dip, then `call.quality` and `call.completed`, last."""
    steps: list[Step] = []
    total = exchanges if exchanges is not None else rng.randint(2, len(USER_LINES))
    duration = 0.0
    for n in range(total):
        user_turn = _id(rng, "trn")
        steps += _speak(rng, "user", USER_LINES[n % len(USER_LINES)], user_turn)
        agent_line = AGENT_LINES[n % len(AGENT_LINES)]
        agent_turn = _id(rng, "trn")
        steps.append(
            Step(
                rng.uniform(0.3, 0.6),
                "event",
                {
                    "event_type": "call.agent_response",
                    "payload": {"turn_id": agent_turn, "text": agent_line},
                },
            )
        )
        if transport in ("esl", "sip") and rng.random() < 0.25:
            # The caller talks over the agent: the agent stops mid-sentence.
            words = agent_line.split()
            cut = " ".join(words[: max(1, len(words) // 2)])
            steps += _speak(rng, "agent", cut, agent_turn)[:-1]
            steps.append(
                Step(
                    0.1,
                    "event",
                    {
                        "event_type": "call.barge_in",
                        "payload": {"turn_id": agent_turn, "interrupted_text": cut},
                    },
                )
            )
            steps.append(
                Step(
                    0.05,
                    "turn",
                    {"role": "agent", "text": cut, "is_final": True, "turn_id": agent_turn},
                )
            )
        else:
            steps += _speak(rng, "agent", agent_line, agent_turn)
        if rng.random() < 0.15:
            silence = rng.randint(3000, 8000)
            steps.append(
                Step(
                    0.5,
                    "event",
                    {
                        "event_type": "call.idle_silence",
                        "payload": {"silence_ms": silence, "threshold_ms": 3000},
                    },
                )
            )
        if rng.random() < 0.1:
            metric, value, threshold = rng.choice(
                (("packet_loss", 4.5, 3.0), ("jitter", 45.0, 30.0), ("mos", 3.1, 3.5))
            )
            steps.append(
                Step(
                    0.2,
                    "event",
                    {
                        "event_type": "call.quality_degraded",
                        "payload": {"metric": metric, "value": value, "threshold": threshold},
                    },
                )
            )
    duration = sum(step.delay for step in steps)
    steps.append(
        Step(
            0.3,
            "event",
            {
                "event_type": "call.quality",
                "payload": {
                    "mos": round(rng.uniform(3.6, 4.4), 2),
                    "packet_loss_pct": round(rng.uniform(0, 1.5), 2),
                    "jitter_ms": round(rng.uniform(2, 20), 1),
                    "rtt_ms": round(rng.uniform(20, 120), 1),
                },
            },
        )
    )
    steps.append(
        Step(
            0.1,
            "event",
            {
                "event_type": "call.completed",
                "payload": {
                    "status": "completed",
                    "duration_seconds": round(duration, 3),
                    "ended_by": rng.choice(("user", "agent")),
                },
            },
        )
    )
    return steps


def conversation_script(rng: random.Random, *, exchanges: int | None = None) -> list[Step]:
    """Inbound messages, AI replies going sent, delivered, read, and the odd handoff."""
    steps: list[Step] = []
    mode = "ai"
    for n in range(exchanges if exchanges is not None else rng.randint(1, len(INBOUND_TEXTS))):
        inbound = _id(rng, "msg")
        steps.append(
            Step(
                rng.uniform(1.0, 3.0),
                "event",
                {
                    "event_type": "message.received",
                    "payload": {
                        "message_id": inbound,
                        "direction": "inbound",
                        "text": INBOUND_TEXTS[n % len(INBOUND_TEXTS)],
                        "status": "received",
                    },
                },
            )
        )
        if mode == "ai":
            reply, text = _id(rng, "msg"), REPLY_TEXTS[n % len(REPLY_TEXTS)]
            for status, delay in (("sent", 0.8), ("delivered", 0.5), ("read", 1.5)):
                steps.append(
                    Step(
                        delay,
                        "event",
                        {
                            "event_type": f"message.{status}",
                            "payload": {
                                "message_id": reply,
                                "direction": "outbound",
                                "text": text,
                                "status": status,
                            },
                        },
                    )
                )
        if rng.random() < 0.2:
            to_mode = "human" if mode == "ai" else "ai"
            steps.append(
                Step(
                    0.5,
                    "event",
                    {
                        "event_type": "conversation.mode_changed",
                        "payload": {
                            "from_mode": mode,
                            "to_mode": to_mode,
                            "actor_user_id": "usr_simulated_agent",
                        },
                    },
                )
            )
            mode = to_mode
    return steps
