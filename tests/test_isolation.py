"""SPEC section 6, isolation: another workspace's ids are 404 everywhere, and the database
itself (row-level security) refuses to show or write another workspace's rows."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest

from switchboard.db.database import APP_ROLE, stored_app_role_url
from switchboard.ids import new_id
from tests.harness import ServerThread, Workspace, insert_turn
from tests.routes import fill, routes

TABLES = (
    "workspaces",
    "api_keys",
    "agents",
    "calls",
    "turns",
    "conversations",
    "messages",
    "conversation_mode_changes",
    "webhook_endpoints",
)


async def populate(
    client: httpx.AsyncClient, owner: Workspace, database_url: str
) -> dict[str, str]:
    """One of everything in `owner`'s workspace; returns the ids by path parameter name."""
    h = owner.headers
    agent = (await client.post("/v1/agents", headers=h, json={"name": "Ava"})).json()
    call = (
        await client.post(
            "/v1/calls",
            headers=h,
            json={
                "to_number": "+14155550100",
                "from_number": "+14155550101",
                "agent_id": agent["id"],
            },
        )
    ).json()
    message = (
        await client.post(
            "/v1/messages",
            headers=h,
            json={
                "channel": "sms",
                "to_number": "+14155550102",
                "from_number": "+14155550103",
                "text": "hello",
            },
        )
    ).json()
    mode = await client.patch(
        f"/v1/conversations/{message['conversation_id']}", headers=h, json={"ai_mode": "human"}
    )
    assert mode.status_code == 200
    key = (await client.post("/v1/keys", headers=h, json={"name": "spare"})).json()
    await insert_turn(database_url, owner.id, call["id"], "user", "hi there")
    hook = (
        await client.post("/v1/webhooks", headers=h, json={"url": "http://127.0.0.1:9/hook"})
    ).json()
    return {
        "agent_id": agent["id"],
        "call_id": call["id"],
        "conversation_id": message["conversation_id"],
        "key_id": key["id"],
        "webhook_id": hook["id"],
        "delivery_id": new_id("del"),
    }


async def test_every_route_with_an_id_is_404_for_another_workspace(
    client: httpx.AsyncClient,
    server: ServerThread,
    workspace: Workspace,
    other_workspace: Workspace,
    database_url: str,
) -> None:
    ids = await populate(client, workspace, database_url)
    before = await client.get(f"/v1/calls/{ids['call_id']}", headers=workspace.headers)
    checked = []
    for method, template, params in routes(server.app):
        if not params or method == "WS":
            continue
        missing = set(params) - set(ids)
        assert not missing, f"no id of kind {missing} to test {method} {template} with"
        body: dict[str, Any] = {"ai_mode": "closed"} if "conversations" in template else {}
        if template.startswith("/v1/agents"):
            body = {"name": "stolen"}
        response = await client.request(
            method, fill(template, ids), headers=other_workspace.headers, json=body
        )
        assert response.status_code == 404, (method, template, response.text)
        assert response.json()["error_code"] == "NOT_FOUND"
        checked.append((method, template))
    assert len(checked) >= 8
    # Nothing the other workspace tried changed anything.
    after = await client.get(f"/v1/calls/{ids['call_id']}", headers=workspace.headers)
    assert after.json() == before.json()
    conversation = await client.get(
        f"/v1/conversations/{ids['conversation_id']}", headers=workspace.headers
    )
    assert conversation.json()["ai_mode"] == "human"
    keys = await client.get("/v1/keys", headers=workspace.headers)
    assert all(k["revoked_at"] is None for k in keys.json()["keys"])


async def test_lists_show_only_the_callers_workspace(
    client: httpx.AsyncClient, workspace: Workspace, other_workspace: Workspace, database_url: str
) -> None:
    ids = await populate(client, workspace, database_url)
    for path, resource in (
        ("/v1/calls", "calls"),
        ("/v1/agents", "agents"),
        ("/v1/conversations", "conversations"),
        ("/v1/keys", "keys"),
    ):
        mine = await client.get(path, headers=workspace.headers)
        theirs = await client.get(path, headers=other_workspace.headers)
        assert mine.status_code == theirs.status_code == 200
        assert mine.json()[resource], path
        their_ids = {row["id"] for row in theirs.json()[resource]}
        assert not their_ids & {row["id"] for row in mine.json()[resource]}, path
    assert (
        ids["call_id"] not in (await client.get("/v1/calls", headers=other_workspace.headers)).text
    )


async def test_the_application_role_sees_nothing_without_a_workspace_and_one_with_it(
    client: httpx.AsyncClient, database_url: str, workspace: Workspace, other_workspace: Workspace
) -> None:
    await populate(client, workspace, database_url)
    await populate(client, other_workspace, database_url)
    owner = await asyncpg.connect(database_url)
    app = await asyncpg.connect(await stored_app_role_url(database_url))
    try:
        for table in TABLES:
            column = "id" if table == "workspaces" else "workspace_id"
            total = await owner.fetchval(f"SELECT count(*) FROM {table}")
            assert total > 0, table
            # No workspace set: zero rows, not an error and not everything.
            assert await app.fetchval(f"SELECT count(*) FROM {table}") == 0, table
            for tenant in (workspace, other_workspace):
                async with app.transaction():
                    await app.execute("SELECT set_config('app.workspace_id', $1, true)", tenant.id)
                    seen = await app.fetch(f"SELECT {column} AS ws FROM {table}")
                expected = await owner.fetchval(
                    f"SELECT count(*) FROM {table} WHERE {column} = $1", tenant.id
                )
                assert len(seen) == expected > 0, table
                assert {row["ws"] for row in seen} == {tenant.id}, table
    finally:
        await app.close()
        await owner.close()


async def test_the_application_role_cannot_write_into_another_workspace_or_bypass_rls(
    database_url: str, workspace: Workspace, other_workspace: Workspace
) -> None:
    app = await asyncpg.connect(await stored_app_role_url(database_url))
    owner = await asyncpg.connect(database_url)
    try:
        role = await owner.fetchrow(
            "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = $1", APP_ROLE
        )
        assert role is not None and not role["rolsuper"] and not role["rolbypassrls"]
        owned = await owner.fetchval(
            "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
            "WHERE r.rolname = $1",
            APP_ROLE,
        )
        assert owned == 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with app.transaction():
                await app.execute("SELECT set_config('app.workspace_id', $1, true)", workspace.id)
                await app.execute(
                    "INSERT INTO agents (id, workspace_id, name) "
                    "VALUES ('agt_x0000000000000000', $1, 'x')",
                    other_workspace.id,
                )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.execute("SET row_security = off; SELECT count(*) FROM calls")
        # The key lookup function is the one way around RLS, and it reveals only hashes.
        rows = await app.fetch("SELECT * FROM lookup_api_key($1)", workspace.key[:16])
        assert [r["workspace_id"] for r in rows] == [workspace.id]
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app.execute("CREATE TABLE sneaky (id int)")
    finally:
        await owner.close()
        await app.close()


async def test_every_workspace_owned_table_has_row_level_security(database_url: str) -> None:
    """New tables are covered without editing this test: any table with a workspace_id."""
    owner = await asyncpg.connect(database_url)
    try:
        rows = await owner.fetch(
            """SELECT c.relname, c.relrowsecurity,
                      EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid
                              AND p.polname = 'workspace_isolation') AS has_policy
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = 'public' AND c.relkind = 'r'
                 AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                             AND a.attname = 'workspace_id' AND NOT a.attisdropped)"""
        )
    finally:
        await owner.close()
    assert len(rows) >= 11  # and `workspaces` itself, keyed on id, has its own policy
    for row in rows:
        assert row["relrowsecurity"] and row["has_policy"], row["relname"]
