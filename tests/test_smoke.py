from __future__ import annotations

import httpx

from tests.harness import Workspace


async def test_workspace_answers_with_its_key(
    client: httpx.AsyncClient, workspace: Workspace
) -> None:
    response = await client.get("/v1/workspace", headers=workspace.headers)
    assert response.status_code == 200
    assert response.json()["id"] == workspace.id
