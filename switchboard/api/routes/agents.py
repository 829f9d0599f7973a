"""Agents: the AI personas that answer calls and conversations."""

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
from switchboard.errors import not_found
from switchboard.ids import new_id

router = APIRouter(tags=["agents"])


@router.post("/v1/agents", status_code=201, response_model=models.Agent)
async def create_agent(
    body: models.AgentCreate, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    async with services.database.workspace(principal.workspace_id) as conn:
        row = await conn.fetchrow(
            """INSERT INTO agents (id, workspace_id, name, instructions)
               VALUES ($1, $2, $3, $4) RETURNING *""",
            new_id("agt"),
            principal.workspace_id,
            body.name,
            body.instructions,
        )
    return render.agent(row)


@router.get("/v1/agents", response_model=models.AgentList, response_model_exclude_unset=True)
async def list_agents(
    services: ServicesDep,
    principal: PrincipalDep,
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = None,
) -> dict[str, Any]:
    before = decode_page_token("agents", page_token)
    async with services.database.workspace(principal.workspace_id) as conn:
        rows = await fetch_page(conn, "agents", before, page_size)
    return page("agents", rows, page_size, [render.agent(r) for r in rows])


@router.get("/v1/agents/{agent_id}", response_model=models.Agent)
async def get_agent(
    agent_id: models.AgentId, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    async with services.database.workspace(principal.workspace_id) as conn:
        row = await conn.fetchrow("SELECT * FROM agents WHERE id = $1", agent_id)
    if row is None:
        raise not_found("agent", agent_id)
    return render.agent(row)


@router.patch("/v1/agents/{agent_id}", response_model=models.Agent)
async def update_agent(
    agent_id: models.AgentId,
    body: models.AgentUpdate,
    services: ServicesDep,
    principal: PrincipalDep,
) -> dict[str, Any]:
    async with services.database.workspace(principal.workspace_id) as conn:
        row = await conn.fetchrow(
            """UPDATE agents SET name = coalesce($2, name),
                                 instructions = coalesce($3, instructions),
                                 updated_at = now()
               WHERE id = $1 RETURNING *""",
            agent_id,
            body.name,
            body.instructions,
        )
    if row is None:
        raise not_found("agent", agent_id)
    return render.agent(row)
