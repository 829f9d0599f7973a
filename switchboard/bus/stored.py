"""Reading back what JetStream stored, for resume (SPEC 5.4): one message by its sequence, and
the messages of a subject (wildcards allowed) after a sequence, a page per request (a batched
direct get: up to `PAGE` messages answer one request, so a resume of 50 frames is one round
trip, not 50)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg

from switchboard.outage import BusUnavailable

PAGE = 256
ANSWER_TIMEOUT = 5.0


@dataclass(frozen=True)
class Stored:
    seq: int
    subject: str
    data: bytes
    stored_at: datetime


def _stored_at(stamp: str) -> datetime:
    # RFC 3339 with nanoseconds ("...T00:36:11.4014721Z"); datetime takes microseconds.
    head, _, fraction = stamp.rstrip("Z").partition(".")
    moment = datetime.fromisoformat(head).replace(tzinfo=UTC)
    return moment.replace(microsecond=int((fraction + "000000")[:6])) if fraction else moment


def _stored(msg: Msg) -> Stored:
    headers = msg.headers or {}
    return Stored(
        seq=int(headers["Nats-Sequence"]),
        subject=headers["Nats-Subject"],
        data=msg.data,
        stored_at=_stored_at(headers.get("Nats-Time-Stamp", "1970-01-01T00:00:00Z")),
    )


def _status(msg: Msg) -> str | None:
    return (msg.headers or {}).get("Status")


async def _ask(client: Client, stream: str, request: dict[str, object]) -> list[Msg]:
    """Sends one direct-get request; returns its answers up to the end of the batch."""
    inbox = client.new_inbox()
    subscription = await client.subscribe(inbox)
    answers: list[Msg] = []
    try:
        await client.publish(f"$JS.API.DIRECT.GET.{stream}", orjson.dumps(request), reply=inbox)
        while True:
            msg = await subscription.next_msg(timeout=ANSWER_TIMEOUT)
            status = _status(msg)
            if status is None:
                answers.append(msg)
                if "batch" not in request:
                    return answers
            elif status in ("204", "404"):  # end of batch; nothing (more) there
                return answers
            else:  # 503 no responders, 408: the stream cannot answer now
                raise BusUnavailable(f"the history of {stream} did not answer ({status})")
    except (nats.errors.Error, OSError) as failure:
        raise BusUnavailable(
            f"the history of {stream} did not answer: {type(failure).__name__}"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()


async def message_at(client: Client, stream: str, seq: int) -> Stored | None:
    """The message stored at `seq`, or None when there is none (never was, or aged out)."""
    answers = await _ask(client, stream, {"seq": seq})
    return _stored(answers[0]) if answers else None


async def last_message(client: Client, stream: str, subject: str) -> Stored | None:
    """The last message stored on `subject`, or None when there is none."""
    answers = await _ask(client, stream, {"last_by_subj": subject})
    return _stored(answers[0]) if answers else None


async def stored_after(
    client: Client, stream: str, subject: str, after: int, *, until: int | None = None
) -> AsyncIterator[Stored]:
    """The messages stored on `subject` after sequence `after` (up to `until` when given), in
    order, read a page per request."""
    seq = after + 1
    while until is None or seq <= until:
        page = await _ask(client, stream, {"seq": seq, "next_by_subj": subject, "batch": PAGE})
        for msg in page:
            stored = _stored(msg)
            if until is not None and stored.seq > until:
                return
            yield stored
        # The server may answer with fewer than a page (a size cap): what says there is no more
        # is the count of matching messages after the last one it sent.
        if not page or (page[-1].headers or {}).get("Nats-Num-Pending", "0") == "0":
            return
        seq = _stored(page[-1]).seq + 1
