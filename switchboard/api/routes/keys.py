"""API keys: create (the secret is shown once), list, revoke (effective at once everywhere)."""

from __future__ import annotations

import logging
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
from switchboard.errors import not_found
from switchboard.workspaces import insert_key

router = APIRouter(tags=["keys"])
log = logging.getLogger(__name__)


@router.post("/v1/keys", status_code=201, response_model=models.ApiKeyCreated)
async def create_key(
    body: models.KeyCreate, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    async with services.database.workspace(principal.workspace_id) as conn:
        row, secret = await insert_key(conn, principal.workspace_id, body.name, body.mode)
    return {**render.api_key(row), "api_key": secret}


@router.get("/v1/keys", response_model=models.ApiKeyList, response_model_exclude_unset=True)
async def list_keys(
    services: ServicesDep,
    principal: PrincipalDep,
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = None,
) -> dict[str, Any]:
    before = decode_page_token("keys", page_token)
    async with services.database.workspace(principal.workspace_id) as conn:
        rows = await fetch_page(conn, "api_keys", before, page_size)
    return page("keys", rows, page_size, [render.api_key(r) for r in rows])


@router.delete("/v1/keys/{key_id}", response_model=models.ApiKey)
async def revoke_key(
    key_id: models.KeyId, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    async with services.database.workspace(principal.workspace_id) as conn:
        row = await conn.fetchrow(
            """UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
               WHERE id = $1 RETURNING *""",
            key_id,
        )
    if row is None:
        raise not_found("API key", key_id)
    services.authenticator.forget_key(key_id)
    try:
        await services.bus.announce_key_revoked(key_id)
    except Exception:  # the database already says revoked; other replicas' caches expire anyway
        log.warning("could not announce a key revocation on the bus", extra={"key_id": key_id})
    return render.api_key(row)
