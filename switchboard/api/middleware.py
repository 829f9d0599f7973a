"""Gateway middleware, as plain ASGI: request ids, the access log and the last word on errors,
the body limit, the write deadline, and authentication with the query-credential policy. Each is
small and knows nothing of the routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.utils import ClientDisconnected

from switchboard.api.handoff import release_when_done
from switchboard.api.responses import body_too_large, error_for_exception, send_error
from switchboard.auth.authenticator import Authenticator, AuthFailure
from switchboard.auth.keys import MalformedAuthorization, bearer_credential
from switchboard.auth.policy import (
    OTHER_CREDENTIAL_REFUSED,
    QUERY_PARAM_REFUSED,
    is_stream_path,
    other_query_credentials,
    query_token_allowed,
    query_tokens,
    stream_call_id,
)
from switchboard.db.commits import reporting_commits
from switchboard.errors import ApiError
from switchboard.ids import new_id
from switchboard.live.metrics import Metrics
from switchboard.logs import access_level
from switchboard.outage import OutageLog, unavailable_dependency

if TYPE_CHECKING:
    from switchboard.api.early_refusal import EarlyRefusal

access_log = logging.getLogger("switchboard.access")
log = logging.getLogger(__name__)


def log_access(
    method: str, path: str, status: int, fetch_site: str | None, request_id: str, started: float
) -> None:
    """A request's access-log line (`started`: its `time.perf_counter()` at arrival)."""
    access_log.log(
        access_level(method, path, status, fetch_site),
        "%s %s %s",
        method,
        path,
        status,
        extra={
            "request_id": request_id,
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
        },
    )


def is_v1(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


@dataclass
class Progress:
    """How far the response to one request has gone, as seen by the outermost layer."""

    status: int = 0
    started: bool = False
    complete: bool = False
    closed: bool = False  # a WebSocket that was accepted has been closed


class RequestContext:
    """The outermost layer. Gives every request a `req_` id, echoed in `X-Request-Id`; marks
    every `/v1` response `Cache-Control: no-store` (they are per-key data, some hold secrets);
    writes one access-log line that holds the path but never the query string (where a `token`
    may be); and has the last word on any exception below it, whichever layer it came from
    (authentication, the raw stream endpoints, the framework):

    - a dependency outage (`switchboard.outage.unavailable_dependency`) is a 503 UNAVAILABLE
      with `Retry-After`, logged through an OutageLog: one line when it starts, one when it
      ends, a reminder now and then, never a traceback per request;
    - anything else is a bug: a 500 envelope without a stack trace, logged with one;
    - a WebSocket upgrade that fails gets the HTTP denial response; an accepted one that fails
      is closed with 1011; an HTTP response that fails half-way can only be cut.

    The framework answers exceptions inside it itself and re-raises them; those arrive here
    with the response complete, and are only logged."""

    def __init__(self, app: ASGIApp, bus_connected: Callable[[], bool] = lambda: True) -> None:
        self.app = app
        self.bus_connected = bus_connected
        # Set by create_app: refusals the HTTP protocol writes before calling this layer.
        self.early_refusal: EarlyRefusal | None = None
        self.outages = {
            "database": OutageLog(log, "The database (as the HTTP API sees it)"),
            "bus": OutageLog(log, "The bus (as the HTTP API sees it)"),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = new_id("req")
        scope.setdefault("state", {})["request_id"] = request_id
        path = scope["path"]
        extra_headers = [(b"x-request-id", request_id.encode())]
        if is_v1(path):
            extra_headers.append((b"cache-control", b"no-store"))
        started = time.perf_counter()
        progress = Progress()

        async def send_with_id(message: Message) -> None:
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                message = {**message, "headers": _with(message.get("headers", []), extra_headers)}
                progress.status, progress.started = message["status"], True
            elif kind == "websocket.accept":
                message = {**message, "headers": _with(message.get("headers", []), extra_headers)}
                progress.status, progress.started = 101, True
            elif kind in ("http.response.body", "websocket.http.response.body"):
                progress.complete = not message.get("more_body", False)
            elif kind == "websocket.close":
                if not progress.started:
                    progress.status = 403  # the server refuses an upgrade closed before accept
                progress.started = progress.complete = progress.closed = True
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except DeadlineExceededAfterStart:
            # Returning with the body unfinished makes the server drop the connection.
            log.warning("write deadline passed mid-response", extra={"request_id": request_id})
        except (ClientDisconnected, ClientDisconnect):
            pass  # the client left mid-request: nothing to answer, nothing went wrong
        except Exception as error:
            await self._failed(scope, error, progress, send_with_id)
        else:
            self._succeeded(path, progress.status)
        finally:
            if self.outages["bus"].down and self.bus_connected():
                self.outages["bus"].recovered()
            method = scope.get("method", "WS")
            fetch_site = _header(scope, b"sec-fetch-site")
            status = progress.status
            # A stream whose connection outlives this call is logged when it ends.
            release_when_done(
                scope, partial(log_access, method, path, status, fetch_site, request_id, started)
            )

    async def _failed(self, scope: Scope, error: Exception, progress: Progress, send: Send) -> None:
        dependency = unavailable_dependency(error)
        if dependency is not None:
            self.outages[dependency].failed(error)
        else:
            log.error(
                "unhandled error",
                exc_info=error,
                extra={"request_id": scope["state"]["request_id"]},
            )
        if not progress.started:
            await send_error(scope, send, error_for_exception(error))
        elif progress.status == 101 and not progress.closed:
            with contextlib.suppress(ClientDisconnected, RuntimeError):  # already gone
                await send({"type": "websocket.close", "code": 1011, "reason": "internal error"})
        # else: complete (the framework answered) or cut half-way (the server drops it).

    def _succeeded(self, path: str, status: int) -> None:
        """A `/v1` success ends an outage of the database: every one has used it (a route's
        rows, a key not yet cached, a call's state). The bus is judged by its client's own
        state instead (a stream may open degraded while it is away)."""
        if 0 < status < 400 and is_v1(path):
            self.outages["database"].recovered()


def _with(headers: Any, extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` plus those of `extra` whose names it does not already have."""
    merged = list(headers)
    present = {name.lower() for name, _ in merged}
    merged.extend((name, value) for name, value in extra if name not in present)
    return merged


class BodyTooLargeError(Exception):
    """Raised into whoever reads a body past the limit, so that it stops reading."""


class BodyLimit:
    """Refuses a request body over `max_bytes` with 413 before buffering it: at once when its
    Content-Length says so, otherwise (chunked) as soon as the bytes received pass the limit;
    whatever the application answered to the body it could not finish reading is replaced by
    the 413. The 413 closes the connection, so the rest of the body is never read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(scope, send, body_too_large(self.max_bytes))
            return
        if is_stream_path(scope["path"]):
            # A stream never reads a body, so nothing is buffered, and it lives for hours:
            # no wrappers held for its lifetime.
            await self.app(scope, receive, send)
            return
        received = 0
        over = started = False

        async def counting_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise BodyTooLargeError
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if not over:
                started = started or message["type"] == "http.response.start"
                await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not over:
                raise
        # (Had the response begun before the body ran over, it is left unfinished: cut.)
        if over and not started:
            await send_error(scope, send, body_too_large(self.max_bytes))


class DeadlineExceededAfterStart(Exception):
    """The deadline passed mid-response: the only honest thing left is to close the connection."""


class WriteDeadline:
    """Every route but the three streams must finish writing its response within `seconds`:
    504 DEADLINE_EXCEEDED if nothing was sent yet, otherwise the connection is closed. A request
    whose transaction has begun to commit is the exception: it finishes its answer, because an
    error would report a write that happened as failed (a phantom write)."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_stream_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        response_started = False
        committed = expired = False
        task = asyncio.current_task()
        assert task is not None

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        def on_commit() -> None:
            nonlocal committed
            committed = True

        def on_deadline() -> None:
            nonlocal expired
            # A request that has begun to commit finishes its answer, late rather than false:
            # a 504 or a cut connection now could report a write that happened as failed.
            if not committed:
                expired = True
                task.cancel()

        loop = asyncio.get_running_loop()
        deadline = loop.call_at(loop.time() + self.seconds, on_deadline)
        try:
            with reporting_commits(on_commit):
                await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if not expired or task.uncancel() > 0:
                raise  # cancelled by someone else (shutdown, a disconnect) as well
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
        finally:
            deadline.cancel()


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
        query = scope.get("query_string", b"")
        tokens = query_tokens(query)
        others = other_query_credentials(query)
        try:
            # Refused on every path but two, /v1 or not: a key in a URL leaks wherever it goes.
            if (tokens or others) and not query_token_allowed(method, path):
                raise AuthFailure("query_token_refused", QUERY_PARAM_REFUSED)
            # On those two, only `token` itself: `TOKEN=`, `access_token=`, a key under another
            # name are refused rather than ignored beside a valid credential.
            if others:
                raise AuthFailure("query_token_refused", OTHER_CREDENTIAL_REFUSED)
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
        if scope["type"] == "websocket":
            # The framework refuses an upgrade it has no route for with a bare close (a 403
            # without a body); this is the same 404 envelope as for any unknown path.
            message = f"No WebSocket route {scope['path']}."
            await send_error(scope, send, ApiError("NOT_FOUND", message))
            return
        if scope["type"] == "http" and scope["path"].endswith("\n"):
            # The framework's route patterns end in `$`, which also matches before a final
            # newline: `/v1/calls/{id}/transcript/stream%0A` would be served as the stream,
            # but under the write deadline and the wrong ?token= rule. No path ends so.
            message = f"No route {scope['method']} {scope['path']}."
            await send_error(scope, send, ApiError("NOT_FOUND", message))
            return
        await self.app(scope, receive, send)
