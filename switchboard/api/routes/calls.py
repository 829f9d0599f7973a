"""Calls: place one, list, read one with its final turns, hang up."""

from __future__ import annotations

import logging
from typing import Any, Literal

import orjson
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
from switchboard.errors import ApiError, not_found
from switchboard.events import call_control_subject, make_envelope
from switchboard.ids import new_id

router = APIRouter(tags=["calls"])
log = logging.getLogger(__name__)

CallStatus = Literal["in_progress", "completed", "failed", "no_answer", "busy"]


@router.post("/v1/calls", status_code=201, response_model=models.Call)
async def create_call(
    body: models.CallCreate, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Places an outbound call: the row and its `call.initiated` commit together (the outbox
    relay puts the event on the bus), so a bus outage delays the event but refuses nothing."""
    call_id = new_id("call")
    async with services.database.workspace(principal.workspace_id) as conn:
        if body.agent_id is not None:
            exists = await conn.fetchval("SELECT 1 FROM agents WHERE id = $1", body.agent_id)
            if not exists:
                raise ApiError(
                    "NOT_FOUND", f"agent_id: no agent {body.agent_id} in this workspace."
                )
        row = await conn.fetchrow(
            """INSERT INTO calls (id, workspace_id, agent_id, direction, transport,
                                  from_number, to_number, status)
               VALUES ($1, $2, $3, 'outbound', $4, $5, $6, 'in_progress') RETURNING *""",
            call_id,
            principal.workspace_id,
            body.agent_id,
            body.transport,
            body.from_number,
            body.to_number,
        )
        await stage_event(
            conn,
            make_envelope(
                "call.initiated",
                workspace_id=principal.workspace_id,
                channel="voice",
                call_id=call_id,
                agent_id=body.agent_id,
                payload={
                    "direction": "outbound",
                    "from_number": body.from_number,
                    "to_number": body.to_number,
                    "transport": body.transport,
                },
            ),
        )
    return render.call(row)


@router.get("/v1/calls", response_model=models.CallList, response_model_exclude_unset=True)
async def list_calls(
    services: ServicesDep,
    principal: PrincipalDep,
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = None,
    status: CallStatus | None = None,
) -> dict[str, Any]:
    before = decode_page_token("calls", page_token)
    filters = [("status", status)] if status is not None else []
    async with services.database.workspace(principal.workspace_id) as conn:
        rows = await fetch_page(conn, "calls", before, page_size, filters)
    return page("calls", rows, page_size, [render.call(r) for r in rows])


@router.get("/v1/calls/{call_id}", response_model=models.CallWithTurns)
async def get_call(
    call_id: models.CallId, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    async with services.database.workspace(principal.workspace_id) as conn:
        row = await conn.fetchrow("SELECT * FROM calls WHERE id = $1", call_id)
        if row is None:
            raise not_found("call", call_id)
        turns = await conn.fetch("SELECT * FROM turns WHERE call_id = $1 ORDER BY seq", call_id)
    return {**render.call(row), "turns": [render.turn(t) for t in turns]}


@router.delete("/v1/calls/{call_id}", response_model=models.Call)
async def hang_up(
    call_id: models.CallId, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Ends a call in progress (a call already ended is answered as it is). The API records the
    end and stages `call.completed` itself, so the record does not depend on a media plane
    being up; the media plane is told on the control subject to drop the call's media."""
    async with services.database.workspace(principal.workspace_id) as conn:
        row = await conn.fetchrow("SELECT * FROM calls WHERE id = $1 FOR UPDATE", call_id)
        if row is None:
            raise not_found("call", call_id)
        if row["status"] != "in_progress":
            return render.call(row)
        row = await conn.fetchrow(
            """UPDATE calls SET status = 'completed', ended_at = now(), ended_by = 'api',
                   duration_seconds = round(extract(epoch FROM now() - started_at)::numeric, 3)
               WHERE id = $1 RETURNING *""",
            call_id,
        )
        assert row is not None  # the row is locked above, so the update finds it
        await stage_event(
            conn,
            make_envelope(
                "call.completed",
                workspace_id=principal.workspace_id,
                channel="voice",
                call_id=call_id,
                agent_id=row["agent_id"],
                payload={
                    "status": "completed",
                    "duration_seconds": row["duration_seconds"],
                    "ended_by": "api",
                },
            ),
        )
    # Best effort, after the commit: the hang-up has happened whatever the bus does now (an
    # error here must not turn a committed write into a 5xx), and the media plane also learns
    # of it from `call.completed` with `ended_by: "api"` once the relay has published it.
    try:
        await services.bus.publish(
            call_control_subject(principal.workspace_id, call_id),
            orjson.dumps({"action": "hangup", "call_id": call_id}),
        )
    except Exception as failure:
        log.warning(
            "hang-up of %s not sent to the media plane: %s", call_id, type(failure).__name__
        )
    return render.call(row)
