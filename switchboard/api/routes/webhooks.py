"""Webhook endpoints (SPEC section 8): create (the secret is shown once), list, get, update,
delete, rotate the secret, read the delivery log, redeliver, and send a signed test event."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

import httpx
import orjson
from fastapi import APIRouter
from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from switchboard.api import models, render
from switchboard.api.deps import PrincipalDep, Services, ServicesDep
from switchboard.api.pagination import (
    DEFAULT_PAGE_SIZE,
    PageSize,
    PageToken,
    decode_page_token,
    fetch_page,
    page,
)
from switchboard.db import Connection
from switchboard.errors import ApiError, invalid, not_found
from switchboard.events import CATALOGUE, make_envelope
from switchboard.ids import new_id, utc_now
from switchboard.webhooks.safety import UnsafeUrl, check_url
from switchboard.webhooks.sender import post_signed
from switchboard.webhooks.signing import delivery_headers, new_secret

router = APIRouter(tags=["webhooks"])

ROTATION_OVERLAP = timedelta(hours=24)
TEST_TIMEOUT = 5.0  # a test answers the caller at once; a real delivery gets 10 s
WebhookId = Annotated[str, StringConstraints(pattern=r"^whk_[0-9A-Za-z]{16,64}$")]
DeliveryId = Annotated[str, StringConstraints(pattern=r"^del_[0-9A-Za-z]{16,64}$")]


def _known_event_type(value: str) -> str:
    if value not in CATALOGUE:
        raise ValueError(f"{value!r} is not an event type of the catalogue")
    return value


EventType = Annotated[str, AfterValidator(_known_event_type)]


class WebhookCreate(models.Body):
    url: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    event_types: list[EventType] | None = Field(
        default=None, description="Only these event types; omit for every event."
    )
    enabled: bool = True


class WebhookUpdate(models.Body):
    url: Annotated[str, StringConstraints(min_length=1, max_length=2048)] | None = None
    event_types: list[EventType] | None = None
    enabled: bool | None = None


class Webhook(BaseModel):
    id: str
    url: str
    event_types: list[str] | None
    enabled: bool
    created_at: str
    updated_at: str
    secret_rotated_until: str | None = Field(
        description="While set, the previous secret still signs (X-Voicebip-Signature-Previous)."
    )


class WebhookWithSecret(Webhook):
    secret: str = Field(description="The signing secret, shown at creation and rotation only.")


class WebhookList(BaseModel):
    webhooks: list[Webhook]
    next_page_token: str | None = None


class Attempt(BaseModel):
    attempted_at: str
    status_code: int | None
    latency_ms: float | None
    error: str | None
    next_attempt_at: str | None


class Delivery(BaseModel):
    id: str
    event_id: str
    event_type: str
    status: str
    attempts: list[Attempt]
    next_attempt_at: str | None
    created_at: str


class DeliveryList(BaseModel):
    deliveries: list[Delivery]
    next_page_token: str | None = None


class TestRequest(models.Body):
    webhook_id: WebhookId


class TestResult(BaseModel):
    event_id: str
    ok: bool
    status_code: int | None
    latency_ms: float
    error: str | None


def render_webhook(row: Any) -> dict[str, Any]:
    now = utc_now()
    overlap = (
        row["previous_expires_at"]
        if row["previous_expires_at"] and row["previous_expires_at"] > now
        else None
    )
    return {
        "id": row["id"],
        "url": row["url"],
        "event_types": row["event_types"],
        "enabled": row["enabled"],
        "created_at": render.ts(row["created_at"]),
        "updated_at": render.ts(row["updated_at"]),
        "secret_rotated_until": render.ts(overlap),
    }


def render_delivery(row: Any, attempts: list[dict[str, Any]]) -> dict[str, Any]:
    pending = row["status"] == "pending"
    return {
        "id": row["id"],
        "event_id": row["event_id"],
        "event_type": row["event_type"],
        "status": row["status"],
        "attempts": attempts,
        "next_attempt_at": render.ts(row["next_attempt_at"]) if pending else None,
        "created_at": render.ts(row["created_at"]),
    }


async def attempts_of(conn: Connection, delivery_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every attempt of these deliveries, oldest first, by delivery id."""
    rows = await conn.fetch(
        "SELECT * FROM webhook_attempts WHERE delivery_id = ANY($1) ORDER BY id", delivery_ids
    )
    by_delivery: dict[str, list[dict[str, Any]]] = {}
    for a in rows:
        by_delivery.setdefault(a["delivery_id"], []).append(
            {
                "attempted_at": render.ts(a["attempted_at"]),
                "status_code": a["status_code"],
                "latency_ms": a["latency_ms"],
                "error": a["error"],
                "next_attempt_at": render.ts(a["next_attempt_at"]),
            }
        )
    return by_delivery


async def _checked_url(services: Services, url: str) -> str:
    try:
        await check_url(url, services.settings.webhook_allow_private)
    except UnsafeUrl as unsafe:
        raise invalid("url", str(unsafe)) from None
    return url


@router.post("/v1/webhooks", status_code=201, response_model=WebhookWithSecret)
async def create_webhook(
    body: WebhookCreate, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    url = await _checked_url(services, body.url)
    secret = new_secret()
    async with services.database.workspace(principal.workspace_id) as conn:
        row = await conn.fetchrow(
            """INSERT INTO webhook_endpoints (id, workspace_id, url, event_types, enabled, secret)
               VALUES ($1, $2, $3, $4, $5, $6) RETURNING *""",
            new_id("whk"),
            principal.workspace_id,
            url,
            body.event_types,
            body.enabled,
            secret,
        )
    return {**render_webhook(row), "secret": secret}


@router.get("/v1/webhooks", response_model=WebhookList, response_model_exclude_unset=True)
async def list_webhooks(
    services: ServicesDep,
    principal: PrincipalDep,
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = None,
) -> dict[str, Any]:
    before = decode_page_token("webhooks", page_token)
    async with services.database.workspace(principal.workspace_id) as conn:
        rows = await fetch_page(conn, "webhook_endpoints", before, page_size)
    return page("webhooks", rows, page_size, [render_webhook(r) for r in rows])


@router.get("/v1/webhooks/{webhook_id}", response_model=Webhook)
async def get_webhook(
    webhook_id: WebhookId, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    async with services.database.workspace(principal.workspace_id) as conn:
        row = await conn.fetchrow("SELECT * FROM webhook_endpoints WHERE id = $1", webhook_id)
    if row is None:
        raise not_found("webhook", webhook_id)
    return render_webhook(row)


@router.patch("/v1/webhooks/{webhook_id}", response_model=Webhook)
async def update_webhook(
    webhook_id: WebhookId, body: WebhookUpdate, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    url = await _checked_url(services, body.url) if body.url is not None else None
    clear_filter = "event_types" in body.model_fields_set and body.event_types is None
    async with services.database.workspace(principal.workspace_id) as conn:
        row = await conn.fetchrow(
            """UPDATE webhook_endpoints
                  SET url = coalesce($2, url),
                      event_types = CASE WHEN $5 THEN NULL ELSE coalesce($3, event_types) END,
                      enabled = coalesce($4, enabled), updated_at = now()
                WHERE id = $1 RETURNING *""",
            webhook_id,
            url,
            body.event_types,
            body.enabled,
            clear_filter,
        )
    if row is None:
        raise not_found("webhook", webhook_id)
    return render_webhook(row)


@router.delete("/v1/webhooks/{webhook_id}", status_code=204)
async def delete_webhook(
    webhook_id: WebhookId, services: ServicesDep, principal: PrincipalDep
) -> None:
    async with services.database.workspace(principal.workspace_id) as conn:
        deleted = await conn.fetchval(
            "DELETE FROM webhook_endpoints WHERE id = $1 RETURNING id", webhook_id
        )
    if deleted is None:
        raise not_found("webhook", webhook_id)


@router.post("/v1/webhooks/{webhook_id}/rotate-secret", response_model=WebhookWithSecret)
async def rotate_secret(
    webhook_id: WebhookId, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    """A new secret signs from now on; the previous one also signs for 24 h
    (`X-Voicebip-Signature-Previous`, and a second Standard Webhooks signature)."""
    secret = new_secret()
    async with services.database.workspace(principal.workspace_id) as conn:
        row = await conn.fetchrow(
            """UPDATE webhook_endpoints
                  SET previous_secret = secret, previous_expires_at = now() + $3::interval,
                      secret = $2, updated_at = now()
                WHERE id = $1 RETURNING *""",
            webhook_id,
            secret,
            ROTATION_OVERLAP,
        )
    if row is None:
        raise not_found("webhook", webhook_id)
    return {**render_webhook(row), "secret": secret}


@router.get(
    "/v1/webhooks/{webhook_id}/deliveries",
    response_model=DeliveryList,
    response_model_exclude_unset=True,
)
async def list_deliveries(
    webhook_id: WebhookId,
    services: ServicesDep,
    principal: PrincipalDep,
    page_size: PageSize = DEFAULT_PAGE_SIZE,
    page_token: PageToken = None,
) -> dict[str, Any]:
    """Every delivery to this endpoint, newest first, with every attempt."""
    before = decode_page_token("deliveries", page_token)
    async with services.database.workspace(principal.workspace_id) as conn:
        if not await conn.fetchval("SELECT 1 FROM webhook_endpoints WHERE id = $1", webhook_id):
            raise not_found("webhook", webhook_id)
        rows = await fetch_page(
            conn, "webhook_deliveries", before, page_size, [("endpoint_id", webhook_id)]
        )
        attempts = await attempts_of(conn, [r["id"] for r in rows[:page_size]])
    items = [render_delivery(r, attempts.get(r["id"], [])) for r in rows]
    return page("deliveries", rows, page_size, items)


@router.post(
    "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver", response_model=Delivery
)
async def redeliver(
    webhook_id: WebhookId, delivery_id: DeliveryId, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Puts a delivery back in the queue now, with a fresh 24 h window."""
    async with services.database.workspace(principal.workspace_id) as conn:
        row = await conn.fetchrow(
            """UPDATE webhook_deliveries
                  SET status = 'pending', next_attempt_at = now(), first_attempt_at = NULL,
                      lease_until = NULL
                WHERE id = $1 AND endpoint_id = $2 AND status <> 'pending' RETURNING *""",
            delivery_id,
            webhook_id,
        )
        if row is None:
            exists = await conn.fetchval(
                "SELECT status FROM webhook_deliveries WHERE id = $1 AND endpoint_id = $2",
                delivery_id,
                webhook_id,
            )
            if exists is None:
                raise not_found("delivery", delivery_id)
            raise ApiError("ALREADY_EXISTS", f"Delivery {delivery_id} is already pending.")
        attempts = await attempts_of(conn, [row["id"]])
    return render_delivery(row, attempts.get(row["id"], []))


@router.post("/v1/webhooks/test", response_model=TestResult)
async def test_webhook(
    body: TestRequest, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Sends a signed sample `call.completed` to the endpoint at once and reports the answer.
    Nothing is stored; the sample's ids are made up."""
    async with services.database.workspace(principal.workspace_id) as conn:
        row = await conn.fetchrow("SELECT * FROM webhook_endpoints WHERE id = $1", body.webhook_id)
    if row is None:
        raise not_found("webhook", body.webhook_id)
    envelope = make_envelope(
        "call.completed",
        workspace_id=principal.workspace_id,
        channel="voice",
        call_id=new_id("call"),
        payload={"status": "completed", "duration_seconds": 42.0, "ended_by": "user", "test": True},
    )
    raw = orjson.dumps(envelope)
    now = utc_now()
    headers = delivery_headers([row["secret"]], envelope["event_id"], int(now.timestamp()), raw)
    async with httpx.AsyncClient(follow_redirects=False, timeout=TEST_TIMEOUT) as http:
        outcome = await post_signed(
            http, row["url"], raw, headers, services.settings.webhook_allow_private, now
        )
    return {
        "event_id": envelope["event_id"],
        "ok": outcome.ok,
        "status_code": outcome.status_code,
        "latency_ms": outcome.latency_ms,
        "error": outcome.error,
    }
