"""Liveness and readiness for orchestrators; outside `/v1`, so they need no key."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from switchboard.api.deps import ServicesDep
from switchboard.errors import ApiError

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving HTTP."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Postgres or NATS is unreachable"}})
async def readyz(services: ServicesDep) -> JSONResponse:
    """Postgres answers a query and NATS is connected."""
    checks = {"postgres": "ok", "nats": "ok" if services.bus.connected else "unreachable"}
    try:
        await asyncio.wait_for(services.database.ping(), timeout=2.0)
    except Exception:
        checks["postgres"] = "unreachable"
    if any(v != "ok" for v in checks.values()):
        down = ", ".join(k for k, v in checks.items() if v != "ok")
        raise ApiError("UNAVAILABLE", f"Not ready: {down} unreachable.", retry_after=5)
    return JSONResponse({"status": "ok", "checks": checks})
