"""Gateway middleware, as plain ASGI: request ids and the access log, the write deadline, and
authentication with the `?token=` policy. Each is small and knows nothing of the routes."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from switchboard.api.responses import send_error
from switchboard.auth.authenticator import Authenticator, AuthFailure
from switchboard.auth.keys import MalformedAuthorization, bearer_credential
from switchboard.auth.policy import (
    QUERY_PARAM_REFUSED,
    is_stream_path,
    query_token_allowed,
    query_tokens,
    stream_call_id,
)
from switchboard.errors import ApiError
from switchboard.ids import new_id
from switchboard.live.metrics import Metrics

access_log = logging.getLogger("switchboard.access")
log = logging.getLogger(__name__)


class RequestContext:
    """Gives every request a `req_` id, echoes it in `X-Request-Id`, turns an unexpected
    exception into a 500 envelope without a stack trace, and writes one access-log line that
    holds the path but never the query string (where a `token` may be)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = new_id("req")
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())
        started = time.perf_counter()
        outcome: dict[str, Any] = {"status": 0}

        async def send_with_id(message: Message) -> None:
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                message = {**message, "headers": [*message.get("headers", []), header]}
                outcome["status"] = message["status"]
            elif kind == "websocket.accept":
                message = {**message, "headers": [*message.get("headers", []), header]}
                outcome["status"] = 101
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except DeadlineExceededAfterStart:
            # Returning with the body unfinished makes the server drop the connection.
            log.warning("write deadline passed mid-response", extra={"request_id": request_id})
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id})
            if outcome["status"] == 0:
                await send_error(
                    scope, send_with_id, ApiError("INTERNAL", "An internal error occurred.")
                )
            else:
                raise  # the response has begun: the server closes the connection
        finally:
            access_log.info(
                "%s %s %s",
                scope.get("method", "WS"),
                scope["path"],
                outcome["status"],
                extra={
                    "request_id": request_id,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )


class DeadlineExceededAfterStart(Exception):
    """The deadline passed mid-response: the only honest thing left is to close the connection."""


class WriteDeadline:
    """Every route but the three streams must finish writing its response within `seconds`:
    504 DEADLINE_EXCEEDED if nothing was sent yet, otherwise the connection is closed."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_stream_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        response_started = False

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            async with asyncio.timeout(self.seconds) as window:
                await self.app(scope, receive, tracking_send)
        except TimeoutError:
            if not window.expired():
                raise
            if response_started:
                raise DeadlineExceededAfterStart(scope["path"]) from None
            await send_error(
                scope,
                send,
                ApiError(
                    "DEADLINE_EXCEEDED",
                    f"The response was not written within the {self.seconds:g} s deadline.",
                    headers={"Connection": "close"},
                ),
            )


class Authentication:
    """Every `/v1` route needs a credential: the Authorization header, or `?token=` on the two
    call stream paths only. A `?token=` anywhere else is refused even beside a valid header.
    The principal is left in `scope["state"]["principal"]` for the routes."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator, metrics: Metrics) -> None:
        self.app = app
        self.authenticator = authenticator
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        method = "GET" if scope["type"] == "websocket" else scope["method"]
        tokens = query_tokens(scope.get("query_string", b""))
        try:
            # Refused on every path but two, /v1 or not: a key in a URL leaks wherever it goes.
            if tokens and not query_token_allowed(method, path):
                raise AuthFailure("query_token_refused", QUERY_PARAM_REFUSED)
            if path == "/v1" or path.startswith("/v1/"):
                scope["state"]["principal"] = await self._principal(scope, tokens)
        except ApiError as failure:
            if isinstance(failure, AuthFailure):
                self.metrics.auth_failures[failure.reason] += 1
            await send_error(scope, send, failure)
            return
        await self.app(scope, receive, send)

    async def _principal(self, scope: Scope, tokens: list[str]) -> Any:
        header = _header(scope, b"authorization")
        if tokens and header is not None:
            raise AuthFailure(
                "ambiguous",
                "Send the key either in the Authorization header or as ?token=, not both.",
            )
        if len(tokens) > 1:
            raise AuthFailure("malformed", "Send ?token= once.")
        if tokens:
            credential = tokens[0]
        elif header is None:
            raise AuthFailure(
                "missing", "An API key is required: send 'Authorization: Bearer <API key>'."
            )
        else:
            try:
                credential = bearer_credential(header)
            except MalformedAuthorization as bad:
                raise AuthFailure("malformed", str(bad)) from None
        principal = await self.authenticator.authenticate(credential)
        if principal.is_stream_token:
            # A stream token works only as ?token= on the stream paths of its own call.
            if not tokens:
                raise AuthFailure(
                    "stream_token", "A stream token is accepted only as ?token= on a call stream."
                )
            if stream_call_id(scope["path"]) != principal.call_id:
                raise AuthFailure("stream_token", "This stream token is for another call.")
        return principal


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None


class StreamDispatch:
    """Sends the three stream paths straight to their handlers, past the framework's middleware
    (error pages, exception mapping, body limits), which a long-lived stream does not use and
    which would wrap every frame it writes in several more calls. The routes stay registered in
    the framework's router too, so they are listed and documented like every other route."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute]) -> None:
        self.app = app
        self.stream_routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and is_stream_path(scope["path"]):
            for route in self.stream_routes:
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child_scope)
                    await route.handle(scope, receive, send)
                    return
        await self.app(scope, receive, send)
