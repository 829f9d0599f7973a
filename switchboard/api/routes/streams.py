"""`POST /v1/stream-tokens` and the three live stream routes (their handlers live in `live`)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.routing import Route, WebSocketRoute

from switchboard.api import models
from switchboard.api.deps import PrincipalDep, Services, ServicesDep
from switchboard.auth import stream_tokens
from switchboard.errors import ApiError, not_found
from switchboard.ids import iso_ms
from switchboard.live.sse import ConversationStream, TranscriptStream, WorkspaceStream
from switchboard.live.websocket import CallEventSocket

router = APIRouter(tags=["streams"])


class StreamTokenCreate(models.Body):
    call_id: models.CallId
    ttl_seconds: Annotated[int, Field(ge=stream_tokens.MIN_TTL, le=stream_tokens.MAX_TTL)] = 300


class StreamToken(BaseModel):
    token: str
    expires_at: str


@router.post("/v1/stream-tokens", status_code=201, response_model=StreamToken)
async def create_stream_token(
    body: StreamTokenCreate, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    """A short-lived credential for one call of the workspace, valid only as `?token=` on
    `GET /v1/calls/{id}/transcript/stream` and `GET /v1/calls/{id}/stream`. Revoking the key
    that issued it ends it too."""
    if principal.is_stream_token:
        raise ApiError("UNAUTHENTICATED", "A stream token cannot issue stream tokens.")
    if body.call_id not in await services.database.call_statuses(
        principal.workspace_id, [body.call_id]
    ):
        raise not_found("call", body.call_id)
    expires_at = int(time.time()) + body.ttl_seconds
    claims = stream_tokens.StreamClaims(
        principal.workspace_id, body.call_id, principal.key_id, expires_at
    )
    token = stream_tokens.sign(services.database.stream_token_secret, claims)
    return {"token": token, "expires_at": iso_ms(datetime.fromtimestamp(expires_at, UTC))}


def stream_routes(services: Services) -> list[Route | WebSocketRoute]:
    return [
        Route("/v1/calls/{call_id}/transcript/stream", TranscriptStream(services), methods=["GET"]),
        Route(
            "/v1/conversations/{conversation_id}/stream",
            ConversationStream(services),
            methods=["GET"],
        ),
        WebSocketRoute("/v1/calls/{call_id}/stream", CallEventSocket(services)),
        Route("/v1/events/stream", WorkspaceStream(services), methods=["GET"]),
    ]
