"""Conversations (SMS, WhatsApp): list, read one with its messages, hand off between AI and
human, and page through messages."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from switchboard.api import models, render
from switchboard.api.deps import PrincipalDep, ServicesDep
from switchboard.api.pagination import (
    DEFAULT_PAGE_SIZE,
    PageSize,
    PageToken,
    decode_page_token,
    fetch_page,
    page,
)
from switchboard.bus.event_outbox import stage_event
from switchboard.errors import not_found
from switchboard.events import make_envelope

router = APIRouter(tags=["conversations"])

LATEST_MESSAGES = 50


@router.get(
    "/v1/conversations", response_model=models.ConversationList, response_model_exclude_unset=True
)
async def list_conversations(
    services: ServicesDep,
    principal: PrincipalDep,
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = None,
    ai_mode: models.AiMode | None = None,
) -> dict[str, Any]:
    before = decode_page_token("conversations", page_token)
    filters = [("ai_mode", ai_mode)] if ai_mode is not None else []
    async with services.database.workspace(principal.workspace_id) as conn:
        rows = await fetch_page(conn, "conversations", before, page_size, filters)
    return page("conversations", rows, page_size, [render.conversation(r) for r in rows])


@router.get("/v1/conversations/{conversation_id}", response_model=models.ConversationWithMessages)
async def get_conversation(
    conversation_id: models.ConversationId, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    async with services.database.workspace(principal.workspace_id) as conn:
        row = await conn.fetchrow("SELECT * FROM conversations WHERE id = $1", conversation_id)
        if row is None:
            raise not_found("conversation", conversation_id)
        latest = await conn.fetch(
            "SELECT * FROM messages WHERE conversation_id = $1 ORDER BY seq DESC LIMIT $2",
            conversation_id,
            LATEST_MESSAGES,
        )
    return {**render.conversation(row), "messages": [render.message(m) for m in reversed(latest)]}


@router.get(
    "/v1/conversations/{conversation_id}/messages",
    response_model=models.MessageList,
    response_model_exclude_unset=True,
)
async def list_messages(
    conversation_id: models.ConversationId,
    services: ServicesDep,
    principal: PrincipalDep,
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = None,
) -> dict[str, Any]:
    """Every message of the conversation, newest first."""
    before = decode_page_token("messages", page_token)
    async with services.database.workspace(principal.workspace_id) as conn:
        if not await conn.fetchval("SELECT 1 FROM conversations WHERE id = $1", conversation_id):
            raise not_found("conversation", conversation_id)
        rows = await fetch_page(
            conn, "messages", before, page_size, [("conversation_id", conversation_id)]
        )
    return page("messages", rows, page_size, [render.message(r) for r in rows])


@router.patch("/v1/conversations/{conversation_id}", response_model=models.ConversationChanged)
async def change_mode(
    conversation_id: models.ConversationId,
    body: models.ConversationUpdate,
    services: ServicesDep,
    principal: PrincipalDep,
) -> dict[str, Any]:
    """Hands a conversation to the AI, to a human, or closes it. A change writes the mode history
    and publishes `conversation.mode_changed`; asking for the current mode changes nothing,
    publishes nothing, and answers `changed: false`."""
    actor = body.actor_user_id or principal.key_id
    async with services.database.workspace(principal.workspace_id) as conn:
        row = await conn.fetchrow(
            "SELECT * FROM conversations WHERE id = $1 FOR UPDATE", conversation_id
        )
        if row is None:
            raise not_found("conversation", conversation_id)
        if row["ai_mode"] == body.ai_mode:
            return {**render.conversation(row), "changed": False}
        envelope = make_envelope(
            "conversation.mode_changed",
            workspace_id=principal.workspace_id,
            channel=row["channel"],
            conversation_id=conversation_id,
            agent_id=row["agent_id"],
            payload={"from_mode": row["ai_mode"], "to_mode": body.ai_mode, "actor_user_id": actor},
        )
        updated = await conn.fetchrow(
            "UPDATE conversations SET ai_mode = $2, updated_at = now() WHERE id = $1 RETURNING *",
            conversation_id,
            body.ai_mode,
        )
        await conn.execute(
            """INSERT INTO conversation_mode_changes
                   (workspace_id, conversation_id, event_id, from_mode, to_mode, actor_user_id)
               VALUES ($1, $2, $3, $4, $5, $6)""",
            principal.workspace_id,
            conversation_id,
            envelope["event_id"],
            row["ai_mode"],
            body.ai_mode,
            actor,
        )
        await stage_event(conn, envelope)
    return {**render.conversation(updated), "changed": True}
