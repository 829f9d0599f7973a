"""`POST /v1/messages`: send an SMS or WhatsApp message, in a conversation or starting one."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from switchboard.api import models, render
from switchboard.api.deps import PrincipalDep, ServicesDep
from switchboard.bus.event_outbox import stage_event
from switchboard.errors import ApiError, invalid
from switchboard.events import make_envelope
from switchboard.ids import new_id

router = APIRouter(tags=["messages"])


@router.post("/v1/messages", status_code=201, response_model=models.Message)
async def send_message(
    body: models.MessageCreate, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Sends `text` either in `conversation_id`, or to `to_number` from `from_number` on
    `channel`, which finds or starts the conversation between those two numbers. The message and
    its `message.sent` commit together; the outbox relay puts the event on the bus."""
    by_numbers = (body.channel, body.to_number, body.from_number)
    if body.conversation_id is None and None in by_numbers:
        raise invalid(
            "conversation_id", "give conversation_id, or channel, to_number and from_number"
        )
    if body.conversation_id is not None and any(v is not None for v in by_numbers):
        raise invalid("conversation_id", "give conversation_id or the numbers, not both")
    async with services.database.workspace(principal.workspace_id) as conn:
        if body.conversation_id is not None:
            conversation = await conn.fetchrow(
                "SELECT * FROM conversations WHERE id = $1 FOR UPDATE", body.conversation_id
            )
            if conversation is None:
                raise ApiError(
                    "NOT_FOUND",
                    f"conversation_id: no conversation {body.conversation_id} in this workspace.",
                )
        else:
            conversation = await conn.fetchrow(
                """INSERT INTO conversations (id, workspace_id, channel, customer_number,
                                              business_number)
                   VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (workspace_id, channel, customer_number, business_number)
                   DO UPDATE SET updated_at = now()
                   RETURNING *""",
                new_id("conv"),
                principal.workspace_id,
                body.channel,
                body.to_number,
                body.from_number,
            )
        assert conversation is not None  # the upsert always returns its row
        row = await conn.fetchrow(
            """INSERT INTO messages (id, workspace_id, conversation_id, direction, text, status)
               VALUES ($1, $2, $3, 'outbound', $4, 'sent') RETURNING *""",
            new_id("msg"),
            principal.workspace_id,
            conversation["id"],
            body.text,
        )
        assert row is not None
        await conn.execute(
            "UPDATE conversations SET last_message_at = $2, updated_at = now() WHERE id = $1",
            conversation["id"],
            row["created_at"],
        )
        await stage_event(
            conn,
            make_envelope(
                "message.sent",
                workspace_id=principal.workspace_id,
                channel=conversation["channel"],
                conversation_id=conversation["id"],
                agent_id=conversation["agent_id"],
                payload={
                    "message_id": row["id"],
                    "direction": "outbound",
                    "text": body.text,
                    "status": "sent",
                },
            ),
        )
    return render.message(row)
