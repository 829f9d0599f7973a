"""The per-workspace quotas at the door (SPEC 6, "Limits"): every authenticated `/v1` request
counts against its workspace's requests a minute, and every stream holds one of its open-stream
slots until it ends. Over either, or faster than the burst allowance lets the minute be spent,
429 `RATE_LIMITED` with `Retry-After` and the `X-RateLimit-*` headers (`limits/book.py` says
what they mean); an admitted response that is not a stream carries the request-rate headers
too, so a client can pace itself before it is refused (a stream's would be stale at once, and
wrapping its every write for hours costs memory for nothing)."""

from __future__ import annotations

from functools import partial

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from switchboard.api.handoff import handoff_of
from switchboard.api.responses import send_error
from switchboard.auth.authenticator import Principal
from switchboard.auth.policy import is_stream_path
from switchboard.errors import ApiError
from switchboard.limits.book import BURST, OPEN_STREAMS, Verdict
from switchboard.limits.shared import SharedLimits
from switchboard.live.metrics import Metrics


def refusal(verdict: Verdict, burst: int) -> ApiError:
    if verdict.kind == BURST:
        over = f"pace: {verdict.limit} requests a minute, at most {burst} at once"
    elif verdict.kind == OPEN_STREAMS:
        over = f"limit of {verdict.limit} open streams"
    else:
        over = f"limit of {verdict.limit} requests a minute"
    return ApiError(
        "RATE_LIMITED",
        f"This workspace is over its {over}; retry after {verdict.reset} s.",
        retry_after=verdict.reset,
        headers=verdict.headers(),
    )


class WorkspaceLimits:
    def __init__(self, app: ASGIApp, limits: SharedLimits, metrics: Metrics) -> None:
        self.app = app
        self.limits = limits
        self.refused = metrics.counter(
            "switchboard_rate_limited_total",
            "Requests answered 429 by a per-workspace limit, by the limit.",
            "limit",
        )

    def refuse(self, verdict: Verdict) -> ApiError:
        """Counts a refusal and says why (the early refusals count here too)."""
        self.refused[verdict.kind] += 1
        return refusal(verdict, self.limits.book.burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal: Principal | None = scope.get("state", {}).get("principal")
        if principal is None:  # not /v1 (the console, health, metrics) or not authenticated
            await self.app(scope, receive, send)
            return
        workspace_id = principal.workspace_id
        stream = is_stream_path(scope["path"])
        # A stream's open is also a request: open_stream checks both and counts both, or
        # neither (a refusal changes no count).
        if stream:
            verdict = await self.limits.open_stream(workspace_id)
        else:
            verdict = self.limits.admit_request(workspace_id)
        if not verdict.allowed:
            await send_error(scope, send, self.refuse(verdict))
            return
        if not stream:
            await self.app(scope, receive, with_rate_headers(send, verdict))
            return
        try:
            await self.app(scope, receive, send)
        finally:
            # Held until the stream ends, which may be after this call (api/handoff.py).
            handoff_of(scope).release(partial(self.limits.close_stream, workspace_id))


def with_rate_headers(send: Send, verdict: Verdict) -> Send:
    extra = [(k.lower().encode(), v.encode()) for k, v in verdict.headers().items()]

    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            present = {k for k, _ in message.get("headers", [])}
            added = [(k, v) for k, v in extra if k not in present]
            if added:
                message = {**message, "headers": [*message.get("headers", []), *added]}
        await send(message)

    return send_with_headers
