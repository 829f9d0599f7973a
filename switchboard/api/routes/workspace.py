"""`GET /v1/workspace`: the workspace the key belongs to."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from switchboard.api import models, render
from switchboard.api.deps import PrincipalDep, ServicesDep

router = APIRouter(tags=["workspace"])


@router.get("/v1/workspace", response_model=models.Workspace)
async def get_workspace(services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    async with services.database.workspace(principal.workspace_id) as conn:
        row = await conn.fetchrow("SELECT * FROM workspaces")
    return render.workspace(row)
