"""What a route receives: the process's services and the request's principal."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from switchboard.auth.authenticator import Authenticator, Principal
from switchboard.bus import Bus
from switchboard.config import Settings
from switchboard.db import Database
from switchboard.limits.shared import SharedLimits
from switchboard.live.hub import Hub
from switchboard.live.metrics import Metrics
from switchboard.live.registry import StreamRegistry
from switchboard.live.siblings import SiblingMetrics


@dataclass
class Services:
    settings: Settings
    database: Database
    bus: Bus
    authenticator: Authenticator
    metrics: Metrics
    hub: Hub
    registry: StreamRegistry
    limits: SharedLimits
    background: list[asyncio.Task[None]] = field(default_factory=list)
    # Components started after the services (recorder, simulator), stopped first, newest first.
    stoppers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # The other processes of a `serve --workers N`, whose metrics /metrics sums with these.
    siblings: SiblingMetrics | None = None


async def get_services(request: Request) -> Services:
    # async: FastAPI runs a plain function dependency on a worker thread, a hand-off that
    # cost more than the rest of a small request.
    services: Services = request.app.state.services
    return services


async def get_principal(request: Request) -> Principal:
    # Set by the Authentication middleware, which every /v1 request passes through.
    principal: Principal = request.scope["state"]["principal"]
    return principal


ServicesDep = Annotated[Services, Depends(get_services)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
